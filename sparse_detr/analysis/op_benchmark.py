"""Timing of the deformable attention op backends at the shapes Deformable DETR runs them at."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
import torch

from sparse_detr.errors import UsageError
from sparse_detr.ops import load_backend, ms_deform_attn
from sparse_detr.utils.timer import median_seconds

logger = logging.getLogger(__name__)

# Feature maps of an 800x1066 input at strides 8, 16, 32, 64.
LEVEL_SHAPES_800x1066 = ((100, 134), (50, 67), (25, 34), (13, 17))


@dataclass(frozen=True)
class OpShape:
    """One call of the op: batch, queries, levels, heads, channels per head, points."""

    name: str
    description: str
    batch: int
    num_queries: int | None  # None: every token is a query (encoder self-attention)
    level_shapes: tuple[tuple[int, int], ...] = LEVEL_SHAPES_800x1066
    heads: int = 8
    head_dim: int = 32
    points: int = 4

    @property
    def tokens(self) -> int:
        return sum(h * w for h, w in self.level_shapes)


DEFAULT_SHAPES = (
    OpShape("encoder", "800x1066 input, N=1, every token a query", batch=1, num_queries=None),
    OpShape("decoder", "800x1066 input, N=4, 300 queries", batch=4, num_queries=300),
)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def op_inputs(shape: OpShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random op inputs: locations near uniform reference points, softmax attention weights."""
    generator = torch.Generator().manual_seed(seed)
    n, m, d, p = shape.batch, shape.heads, shape.head_dim, shape.points
    num_levels = len(shape.level_shapes)
    lq = shape.num_queries or shape.tokens
    spatial_shapes = torch.tensor(shape.level_shapes, dtype=torch.int64)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(n, shape.tokens, m, d, generator=generator)
    reference = torch.rand(n, lq, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(n, lq, m, num_levels, p, 2, generator=generator) * 0.02
    locations = reference + offsets
    weights = torch.randn(n, lq, m, num_levels * p, generator=generator).softmax(-1)
    weights = weights.view(n, lq, m, num_levels, p)
    coord_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, coord_dtype),
        weights.to(device, coord_dtype),
    )


def time_backend(
    shape: OpShape, backend: str, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[float, float]:
    """Median milliseconds of forward, and of forward + backward, for one backend at one shape."""
    value, spatial_shapes, level_start_index, locations, weights = op_inputs(shape, device, dtype)

    def forward() -> None:
        with torch.no_grad():
            ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend)

    grad_inputs = [t.detach().requires_grad_() for t in (value, locations, weights)]

    def forward_backward() -> None:
        v, loc, w = grad_inputs
        out = ms_deform_attn(v, spatial_shapes, level_start_index, loc, w, backend)
        out.backward(torch.ones_like(out))
        for t in grad_inputs:
            t.grad = None

    return tuple(median_seconds(fn, repeats, device=device) * 1e3 for fn in (forward, forward_backward))


def run_op_benchmark(
    backends: list[str],
    repeats: int = 5,
    dtype: str = "float32",
    shapes: tuple[OpShape, ...] = DEFAULT_SHAPES,
) -> pd.DataFrame:
    """Time every available backend; speed-ups are against ``"pytorch"`` on the same device."""
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    devices = []
    for kernel in ("cpu", "cuda"):
        if kernel not in backends and not (kernel == "cpu" and "pytorch" in backends):
            continue
        status = load_backend(kernel)
        if status.available:
            devices.append((torch.device(kernel), kernel))
        elif kernel == "cpu":
            logger.info(f"backend 'cpu' unavailable ({status.reason}): timing 'pytorch' only")
            devices.append((torch.device("cpu"), None))
        else:
            logger.info(f"skipping backend 'cuda': {status.reason}")
    rows = []
    for shape in shapes:
        for device, kernel in devices:
            baseline = None
            for backend in ("pytorch", kernel) if kernel else ("pytorch",):
                forward_ms, forward_backward_ms = time_backend(shape, backend, device, _DTYPES[dtype], repeats)
                baseline = baseline or (forward_ms, forward_backward_ms)
                rows.append(
                    {
                        "shape": shape.name,
                        "device": device.type,
                        "backend": backend,
                        "dtype": dtype,
                        "forward_ms": forward_ms,
                        "forward_backward_ms": forward_backward_ms,
                        "forward_speedup": baseline[0] / forward_ms,
                        "forward_backward_speedup": baseline[1] / forward_backward_ms,
                    }
                )
    return pd.DataFrame(rows)
