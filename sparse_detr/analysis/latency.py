"""Inference latency and peak memory of a preset, each measured in a fresh process.

A fresh process per measurement keeps peak RSS (CPU) and peak allocated memory (GPU) specific to one
model, which is what the reference's figures in ``official/README.md`` report.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LatencyRequest:
    """One measurement: random weights, one synthetic batch of ``batch`` images of ``height`` x ``width``."""

    preset: str
    backbone: str | None = None
    keep_ratio: float | None = None
    height: int = 800
    width: int = 1066
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"


def measure_latency(request: LatencyRequest) -> dict:
    """Median forward latency (eval, no_grad) and peak memory, in this process."""
    from sparse_detr.config import get_preset
    from sparse_detr.models import build_model

    if request.threads:
        torch.set_num_threads(request.threads)
    torch.manual_seed(0)
    device = torch.device(request.device)
    model = build_model(get_preset(request.preset, request.backbone)).eval().to(device)
    if request.keep_ratio is not None:
        model.set_keep_ratio(request.keep_ratio)
    images = torch.randn(request.batch, 3, request.height, request.width, device=device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for step in range(request.warmup + request.repeats):
            synchronize()
            start = time.perf_counter()
            outputs = model(images)
            synchronize()
            if step >= request.warmup:
                times.append(time.perf_counter() - start)
    result = {
        **asdict(request),
        "backbone": model.config.model.backbone,
        "keep_ratio": model.keep_ratio,
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "kept_tokens": int(outputs["keep_counts"][0]) if "keep_counts" in outputs else None,
        "tokens": int(outputs["mask_flatten"].shape[1]),
        # ru_maxrss is in KiB on Linux
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def measure_latency_isolated(request: LatencyRequest, timeout_s: float = 3600) -> dict:
    """:func:`measure_latency` in a fresh Python process (so peak memory is this model's alone)."""
    env = dict(os.environ)
    if request.threads:
        env["OMP_NUM_THREADS"] = str(request.threads)
    result = subprocess.run(
        [sys.executable, "-m", "sparse_detr.analysis.latency", json.dumps(asdict(request))],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )
    if result.returncode != 0:
        raise RuntimeError(f"latency measurement of {request.preset} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure_latency(LatencyRequest(**json.loads(sys.argv[1])))))
