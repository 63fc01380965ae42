"""Inference throughput of a detector: images per second at a batch size, with its spread and peak memory."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparse_detr.models.detector import pad_images
from sparse_detr.models.fast_inference import InferenceModel
from sparse_detr.utils.timer import Timer

DEFAULT_ITERS = {"cuda": 50, "cpu": 5}
DEFAULT_WARMUP = {"cuda": 5, "cpu": 1}


@dataclass(frozen=True)
class FpsResult:
    """Throughput over ``iters`` timed forward passes of ``batch_size`` images.

    ``fps`` is the median (images / s); ``fps_q1``/``fps_q3`` the quartiles and ``fps_min``/``fps_max`` the
    extremes over the timed passes; ``latency_ms`` the median time of one pass (one batch).
    ``peak_memory_mib``: on GPU the peak memory allocated by tensors during the timed passes; on CPU the
    peak resident set of the whole process so far (measure in a fresh process to get one model's, see
    :mod:`sparse_detr.analysis.latency`). ``device``: ``cpu`` or the GPU's name; ``dtype``: the
    parameters' dtype, or ``bfloat16 autocast`` / ``float16 autocast``.
    """

    fps: float
    fps_q1: float
    fps_q3: float
    fps_min: float
    fps_max: float
    latency_ms: float
    iters: int
    warmup: int
    batch_size: int
    peak_memory_mib: float
    device: str
    dtype: str
    threads: int


def peak_rss_mib() -> float:
    """Peak resident set of this process's address space, in MiB.

    Linux's VmHWM, not ``getrusage``'s ``ru_maxrss``: a process started with vfork + exec (``subprocess``)
    inherits its parent's peak in ``ru_maxrss``, which would hide a fresh process's own peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's name (``cuda: NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def _batches(images: Sequence[torch.Tensor], batch_size: int, device: torch.device) -> list[tuple]:
    """Padded (images, mask) batches that together hold every image once, cycling to fill the last."""
    count = -(-len(images) // batch_size)
    batches = []
    for start in range(0, count * batch_size, batch_size):
        chosen = [images[(start + offset) % len(images)].to(device) for offset in range(batch_size)]
        batches.append(pad_images(chosen))
    return batches


def _as_image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise ValueError(f"images must be (3, H, W), (N, 3, H, W) or a list of (3, H, W), got {images.dim()}-d")
    if not images or any(image.dim() != 3 for image in images):
        raise ValueError("images must be a non-empty list of (3, H, W) tensors")
    return list(images)


def measure_fps(
    model: nn.Module | InferenceModel,
    images: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int,
    warmup: int | None = None,
    iters: int | None = None,
) -> FpsResult:
    """Time ``model`` in eval mode without gradients (a detector's mode is restored afterwards).

    Args:
        model: the detector as it is, or prepared by
            :func:`~sparse_detr.models.fast_inference.prepare_for_inference` (fast path, autocast, compile),
            on the device to time.
        images: a list of (3, H, W) images (batches cycle through them, so distinct images are timed when
            there are enough), an (N, 3, H, W) tensor (the same), or one (3, H, W) image repeated.
            Batches are padded and moved to the model's device before timing.
        batch_size: images per forward pass.
        warmup: untimed passes first (default 5 on GPU, 1 on CPU; ``torch.compile`` compiles in them).
        iters: timed passes (default 50 on GPU, 5 on CPU).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    runner = model if isinstance(model, InferenceModel) else InferenceModel(model, model, amp=None)
    device = runner.device
    warmup = DEFAULT_WARMUP.get(device.type, 1) if warmup is None else warmup
    iters = DEFAULT_ITERS.get(device.type, 5) if iters is None else iters
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be at least 1 and warmup at least 0, got {iters} and {warmup}")
    batches = _batches(_as_image_list(images), batch_size, device)
    was_training = runner.model.training
    runner.model.eval()
    seconds = []
    try:
        for step in range(warmup + iters):
            batch, mask = batches[step % len(batches)]
            if step == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with Timer(device) as timer:
                runner(batch, mask)
            if step >= warmup:
                seconds.append(timer.seconds)
    finally:
        runner.model.train(was_training)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib()
    fps = sorted(batch_size / s for s in seconds)
    quartiles = statistics.quantiles(fps, n=4, method="inclusive") if len(fps) > 1 else [fps[0]] * 3
    return FpsResult(
        fps=statistics.median(fps),
        fps_q1=quartiles[0],
        fps_q3=quartiles[2],
        fps_min=fps[0],
        fps_max=fps[-1],
        latency_ms=statistics.median(seconds) * 1000,
        iters=iters,
        warmup=warmup,
        batch_size=batch_size,
        peak_memory_mib=peak,
        device=device_name(device),
        dtype=runner.dtype,
        threads=torch.get_num_threads(),
    )
