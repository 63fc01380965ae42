"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch

from sparse_detr.models.token_layout import TokenLayout


def make_op_inputs(
    batch: int,
    level_shapes: list[tuple[int, int]],
    heads: int,
    head_dim: int,
    num_queries: int,
    points: int,
    dtype: torch.dtype = torch.float64,
    spread: float = 1.0,
    seed: int = 0,
):
    """Random ms_deform_attn inputs; ``spread`` > 1 puts points outside [0, 1] (outside the maps)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    tokens = int(spatial_shapes.prod(1).sum())
    num_levels = len(level_shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, num_queries, heads, num_levels, points, 2, generator=generator, dtype=dtype)
    locations = (locations - 0.5) * spread + 0.5
    weights = torch.rand(batch, num_queries, heads, num_levels, points, generator=generator, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def unpadded_layout(level_shapes: list[tuple[int, int]], batch: int = 1) -> TokenLayout:
    """The layout of ``batch`` images that fill levels of these (H_l, W_l) shapes (no padding)."""
    return TokenLayout.of([torch.zeros(batch, height, width, dtype=torch.bool) for height, width in level_shapes])


@pytest.fixture(name="make_op_inputs")
def make_op_inputs_fixture():
    """The :func:`make_op_inputs` factory."""
    return make_op_inputs


@pytest.fixture(scope="session")
def cpu_backend_available() -> bool:
    from sparse_detr.ops import load_backend

    status = load_backend("cpu")
    if not status.available:
        pytest.fail(f"the C++ CPU kernel must build in CI: {status.reason}")
    return True
