"""The MSDeformAttn module: official parameter names, initialization, sampling outputs."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_detr.models.deformable_attention import MSDeformAttn

SHAPES = torch.tensor([[6, 8], [3, 4], [2, 2], [1, 1]])
STARTS = torch.cat([SHAPES.new_zeros(1), SHAPES.prod(1).cumsum(0)[:-1]])
TOKENS = int(SHAPES.prod(1).sum())


def test_parameter_names_and_shapes_match_the_reference():
    shapes = {name: tuple(p.shape) for name, p in MSDeformAttn(256, 4, 8, 4).named_parameters()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_initial_offsets_form_a_star_of_head_directions():
    attn = MSDeformAttn(32, n_levels=2, n_heads=8, n_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(3):
            torch.testing.assert_close(bias[head, 1, point], direction * (point + 1))
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_sampling_outputs_and_backends_agree(ref_dim, cpu_backend_available):
    torch.manual_seed(0)
    attn = MSDeformAttn(16, n_levels=4, n_heads=4, n_points=2).double()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    query = torch.randn(2, 5, 16, dtype=torch.float64)
    reference = torch.rand(2, 5, 4, ref_dim, dtype=torch.float64)
    memory = torch.randn(2, TOKENS, 16, dtype=torch.float64)
    out, locations, weights = attn(query, reference, memory, SHAPES, STARTS, return_sampling=True)
    assert out.shape == (2, 5, 16)
    assert locations.shape == (2, 5, 4, 4, 2, 2) and weights.shape == (2, 5, 4, 4, 2)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 4, dtype=torch.float64))
    reference_out = attn(query, reference, memory, SHAPES, STARTS, backend="pytorch")
    torch.testing.assert_close(out, reference_out, rtol=0, atol=1e-10)


def test_two_dim_reference_offsets_are_in_cells_of_each_level():
    attn = MSDeformAttn(8, n_levels=4, n_heads=1, n_points=1)
    query = torch.zeros(1, 1, 8)
    reference = torch.full((1, 1, 4, 2), 0.5)
    _, locations, _ = attn(query, reference, torch.zeros(1, TOKENS, 8), SHAPES, STARTS, return_sampling=True)
    # head 0 points along +x by one cell: 1 / W_l
    expected_x = 0.5 + 1.0 / SHAPES[:, 1].float()
    torch.testing.assert_close(locations[0, 0, 0, :, 0, 0], expected_x)
    torch.testing.assert_close(locations[0, 0, 0, :, 0, 1], torch.full((4,), 0.5))


def test_padded_tokens_contribute_nothing():
    torch.manual_seed(1)
    attn = MSDeformAttn(8, n_levels=4, n_heads=2, n_points=4)
    query, reference = torch.randn(1, 3, 8), torch.rand(1, 3, 4, 2)
    memory = torch.randn(1, TOKENS, 8)
    mask = torch.zeros(1, TOKENS, dtype=torch.bool)
    mask[0, :10] = True
    changed = memory.clone()
    changed[0, :10] += 100.0
    torch.testing.assert_close(
        attn(query, reference, memory, SHAPES, STARTS, mask),
        attn(query, reference, changed, SHAPES, STARTS, mask),
    )
