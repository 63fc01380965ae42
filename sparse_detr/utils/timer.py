"""Timing a region of work on a device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Elapsed seconds of a region: CUDA events on GPU (the GPU's own clock), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.begin = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.begin


def median_seconds(
    run: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | None = None
) -> float:
    """The median of ``repeats`` timed calls of ``run`` (:class:`Timer` on ``device``, default the CPU) after
    ``warmup`` untimed ones."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        with Timer(device) as timer:
            run()
        seconds.append(timer.seconds)
    return statistics.median(seconds)
