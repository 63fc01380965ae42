"""onnxruntime on CPU against this project's PyTorch CPU paths, on the same exported model, in one run.

For each preset: a random-weight R50 model is exported with ``sdetr``'s exporter to a temporary file, then
onnxruntime (CPU provider), the eager model and the model prepared for inference (fast float32, and bfloat16
autocast) are timed on one random image, batch 1, after one warm-up pass: the median of ``--iters`` passes.
Prints a Markdown table (seconds per image; speed relative to eager PyTorch) with the CPU's model and
extensions, for docs/PERFORMANCE.md. Needs the ``onnx`` extra.

usage: python scripts/onnx_cpu_latency.py [--size 800x1066] [--iters 3] [--threads 2] [--presets A,B]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from sparse_detr.checkpoint import Category
from sparse_detr.config import get_preset
from sparse_detr.export import OnnxDetector, export_onnx, file_metadata
from sparse_detr.models import build_model, prepare_for_inference
from sparse_detr.utils.cpu import cpu_description


def median_seconds(run, iters: int) -> float:
    run()  # warm-up
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="800x1066")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default="sparse-rho0.1,deformable-topk-bbr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(side) for side in args.size.split("x"))
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(get_preset(preset)).eval()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{preset}.onnx"
            start = time.perf_counter()
            classes = {label: Category(label, f"class {label}") for label in range(model.config.model.num_classes)}
            export_onnx(model, path, metadata=file_metadata(model, classes, min(height, width)))
            export_seconds = time.perf_counter() - start
            session = OnnxDetector(path, threads=args.threads)
            times = {"onnxruntime": median_seconds(partial(session, image, mask), args.iters)}
        with torch.no_grad():
            times["eager"] = median_seconds(partial(model, image, mask), args.iters)
        times["fast fp32"] = median_seconds(partial(prepare_for_inference(model), image, mask), args.iters)
        fast_bf16 = prepare_for_inference(build_model(get_preset(preset)).eval(), amp="bf16")
        times["fast bf16"] = median_seconds(partial(fast_bf16, image, mask), args.iters)
        row = {"model": preset, "export": f"{export_seconds:.0f} s"}
        row.update({name: f"{s:.2f} s ({times['eager'] / s:.2f}×)" for name, s in times.items()})
        rows.append(row)
    print(f"CPU: {cpu_description()}; {args.threads} threads; one random {args.size} image, batch 1, "
          f"median of {args.iters} timed passes after one warm-up; random R50 weights (×: speed relative to "
          "eager)\n")  # fmt: skip
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
