"""Timing exported files (``sdetr export``) under the runtimes :class:`~sparse_detr.export.OnnxDetector`
drives, as ``sdetr benchmark --onnx FILE --runtime onnxruntime,openvino`` reports them: the median seconds
of ``iters`` passes over one random image per batch element after ``warmup`` passes, in one process."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from sparse_detr.export import OnnxDetector
from sparse_detr.utils.timer import median_seconds

EXPORTED_COLUMNS = ("file", "runtime", "msda", "batch", "seconds", "fps")


def time_exported(
    paths: Sequence[str | Path],
    runtimes: Sequence[str],
    size: tuple[int, int],
    batch_sizes: Sequence[int] = (1,),
    iters: int = 5,
    warmup: int = 1,
    threads: int | None = None,
) -> pd.DataFrame:
    """One row per file, runtime and batch size (:data:`EXPORTED_COLUMNS`): seconds per batch of random
    (height, width) ``size`` images and images per second."""
    height, width = size
    rows = []
    for path in paths:
        for runtime in runtimes:
            detector = OnnxDetector(path, threads=threads, runtime=runtime)
            for batch in batch_sizes:
                images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
                mask = torch.zeros(batch, height, width, dtype=torch.bool)
                sizes = torch.tensor([[height, width]] * batch)
                seconds = median_seconds(partial(detector, images, mask, orig_sizes=sizes), iters, warmup)
                rows.append({"file": str(path), "runtime": runtime, "msda": detector.msda, "batch": batch,
                             "seconds": seconds, "fps": batch / seconds})  # fmt: skip
    return pd.DataFrame(rows, columns=list(EXPORTED_COLUMNS))
