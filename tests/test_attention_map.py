"""Decoder attention map (DAM) and its coverage by the selected tokens."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import unpadded_layout

from sparse_detr.models.attention_map import attention_coverage, decoder_attention_map, fill_padded_tokens
from sparse_detr.models.token_layout import TokenLayout, TokenSelection

# two levels: (2, 2) then (3, 4); level 1 starts at token 4
LAYOUT = unpadded_layout([(2, 2), (3, 4)])
NUM_TOKENS = 16


def one_point(level: int, x: float, y: float, weight: float = 1.0, dtype=torch.float64):
    """Inputs with a single image, decoder layer, query, head and point, on ``level``."""
    locations = torch.zeros(1, 1, 1, 1, 2, 1, 2, dtype=dtype)
    weights = torch.zeros(1, 1, 1, 1, 2, 1, dtype=dtype)
    locations[..., level, 0, :] = torch.tensor([x, y], dtype=dtype)
    weights[..., level, 0] = weight
    return locations, weights


def naive_attention_map(locations, weights, spatial_shapes, level_start_index):
    """Loop-by-loop DAM, corners by hand: the reference for the vectorized one."""
    n, num_layers, num_queries, num_heads, num_levels, num_points, _ = locations.shape
    dam = torch.zeros(n, int(spatial_shapes.prod(1).sum()), dtype=weights.dtype)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in (n, num_layers, num_queries, num_heads))):
        i, layer, query, head = index.tolist()
        for level in range(num_levels):
            height, width = spatial_shapes[level].tolist()
            for point in range(num_points):
                x, y = (locations[i, layer, query, head, level, point] * torch.tensor([width, height])).tolist()
                weight = weights[i, layer, query, head, level, point].item()
                for cx in (math.floor(x), math.floor(x) + 1):
                    for cy in (math.floor(y), math.floor(y) + 1):
                        if 0 <= cx < width and 0 <= cy < height:
                            bilinear = (1 - abs(x - cx)) * (1 - abs(y - cy))
                            dam[i, level_start_index[level] + cy * width + cx] += weight * bilinear
    return dam


def test_point_between_four_pixels_spreads_bilinear_weights():
    # pixel coords (0.3 * 4, 0.5 * 3) = (1.2, 1.5): corners (1, 1), (2, 1), (1, 2), (2, 2) of level 1
    locations, weights = one_point(level=1, x=0.3, y=0.5, weight=0.5)
    dam = decoder_attention_map(locations, weights, LAYOUT)
    expected = torch.zeros(1, NUM_TOKENS, dtype=torch.float64)
    expected[0, 4 + 1 * 4 + 1] = 0.5 * 0.8 * 0.5
    expected[0, 4 + 1 * 4 + 2] = 0.5 * 0.2 * 0.5
    expected[0, 4 + 2 * 4 + 1] = 0.5 * 0.8 * 0.5
    expected[0, 4 + 2 * 4 + 2] = 0.5 * 0.2 * 0.5
    torch.testing.assert_close(dam, expected)


def test_no_half_pixel_shift():
    # loc * W lands exactly on pixel (1, 1) of level 0: all the weight goes to that one token
    locations, weights = one_point(level=0, x=0.5, y=0.5)
    dam = decoder_attention_map(locations, weights, LAYOUT)
    expected = torch.zeros(1, NUM_TOKENS, dtype=torch.float64)
    expected[0, 1 * 2 + 1] = 1.0
    torch.testing.assert_close(dam, expected)


@pytest.mark.parametrize(
    ("x", "y", "kept"),
    [
        (3.5 / 4, 1 / 3, {4 + 1 * 4 + 3: 0.5}),  # right edge: corner column 4 is outside
        (-0.25 / 4, 2 / 3, {4 + 2 * 4 + 0: 0.75}),  # left of the map: corner column -1 is outside
        (0.5 / 4, 2.5 / 3, {4 + 2 * 4 + 0: 0.25, 4 + 2 * 4 + 1: 0.25}),  # bottom edge: row 3 is outside
        (1.5, 0.5, {}),  # far outside: nothing lands
    ],
)
def test_corners_outside_the_map_are_dropped(x, y, kept):
    locations, weights = one_point(level=1, x=x, y=y)
    dam = decoder_attention_map(locations, weights, LAYOUT)
    expected = torch.zeros(1, NUM_TOKENS, dtype=torch.float64)
    for token, value in kept.items():
        expected[0, token] = value
    torch.testing.assert_close(dam, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_loop_reference_on_random_inputs(make_op_inputs, dtype):
    _, spatial_shapes, level_start_index, locations, weights = make_op_inputs(
        batch=2, level_shapes=[(5, 7), (3, 4)], heads=2, head_dim=1, num_queries=3, points=2, dtype=dtype, spread=1.3
    )
    # (N, Q, M, L, P, ...) -> (N, Ld=2, Q', M, L, P, ...) by splitting the queries into two layers
    locations = torch.stack([locations, locations.flip(1)], dim=1)
    weights = torch.stack([weights, weights.flip(1)], dim=1)
    layout = unpadded_layout(spatial_shapes.tolist())
    dam = decoder_attention_map(locations, weights, layout)
    assert dam.dtype == dtype
    expected = naive_attention_map(locations.double(), weights.double(), spatial_shapes, level_start_index)
    torch.testing.assert_close(dam.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_padded_tokens_get_batch_minimum_minus_one():
    dam = torch.tensor([[3.0, 2.0, 5.0], [4.0, 1.5, 6.0]])
    mask = torch.tensor([[False, False, True], [False, True, False]])
    # the minimum runs over the whole batch, padded tokens included (1.5 here)
    expected = torch.tensor([[3.0, 2.0, 0.5], [4.0, 0.5, 6.0]])
    torch.testing.assert_close(fill_padded_tokens(dam, mask), expected)


def test_fill_padding_fills_padded_tokens():
    locations, weights = one_point(level=1, x=0.3, y=0.5)
    level1_mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    level1_mask[0, -1] = True  # last row of level 1 padded
    layout = TokenLayout.of([torch.zeros(1, 2, 2, dtype=torch.bool), level1_mask])
    mask = layout.padding_mask
    assert mask[0, -4:].all() and mask.sum() == 4
    raw = decoder_attention_map(locations, weights, layout)
    filled = decoder_attention_map(locations, weights, layout, fill_padding=True)
    assert torch.equal(filled[~mask], raw[~mask])
    assert torch.all(filled[mask] == -1.0)  # raw minimum is 0


def test_carries_no_gradient():
    locations, weights = one_point(level=1, x=0.3, y=0.5)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    dam = decoder_attention_map(locations, weights, LAYOUT)
    assert not dam.requires_grad


def test_coverage_is_one_when_every_token_is_selected():
    dam = torch.rand(2, NUM_TOKENS, dtype=torch.float64) + 0.1
    selected = torch.stack([torch.randperm(NUM_TOKENS), torch.randperm(NUM_TOKENS)])
    selection = TokenSelection(selected, torch.tensor([NUM_TOKENS, NUM_TOKENS]))
    overall, per_level = attention_coverage(dam, selection, LAYOUT)
    torch.testing.assert_close(overall, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(per_level, torch.ones(2, 2, dtype=torch.float64))


def test_coverage_counts_only_the_first_keep_counts_tokens():
    dam = torch.arange(1.0, NUM_TOKENS + 1, dtype=torch.float64).expand(2, -1).clone()
    # image 0 keeps tokens 0 and 5; image 1 keeps only token 15 (token 1 is past its count)
    selected = torch.tensor([[0, 5], [15, 1]])
    overall, per_level = attention_coverage(dam, TokenSelection(selected, torch.tensor([2, 1])), LAYOUT)
    total, level0, level1 = 136.0, 10.0, 126.0  # sums of 1..16, 1..4, 5..16
    torch.testing.assert_close(overall, torch.tensor([(1 + 6) / total, 16 / total], dtype=torch.float64))
    expected_levels = torch.tensor([[1 / level0, 6 / level1], [0.0, 16 / level1]], dtype=torch.float64)
    torch.testing.assert_close(per_level, expected_levels)
