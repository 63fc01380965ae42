"""The token layout, the token selection and the prediction heads' slots."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sparse_detr.config import apply_overrides, get_preset, list_presets
from sparse_detr.models.detector import build_model
from sparse_detr.models.heads import HeadSlots
from sparse_detr.models.token_layout import TokenLayout, TokenSelection

OFFICIAL = Path(__file__).resolve().parent / "data" / "official"


def padded_levels() -> list[torch.Tensor]:
    """Per-level masks of two images: image 0 fills the batch, image 1 covers the left half and top 3/4."""
    masks = [torch.zeros(2, height, width, dtype=torch.bool) for height, width in [(4, 6), (2, 3), (1, 2)]]
    masks[0][1, 3:] = masks[0][1, :, 3:] = True
    masks[1][1, :, 2:] = True
    masks[2][1, :, 1:] = True
    return masks


def test_layout_of_per_level_masks():
    layout = TokenLayout.of(padded_levels())
    assert layout.spatial_shapes.tolist() == [[4, 6], [2, 3], [1, 2]]
    assert layout.spatial_shapes.dtype == layout.level_start_index.dtype == torch.int64
    assert layout.level_start_index.tolist() == [0, 24, 30]
    assert layout.level_sizes == [24, 6, 2] and layout.num_tokens == 32
    assert layout.padding_mask.shape == (2, 32) and layout.padding_mask.dtype == torch.bool
    assert not layout.padding_mask[0].any()
    assert layout.padding_mask[1].sum() == (24 - 9) + (6 - 4) + 1
    assert layout.valid_ratios.shape == (2, 3, 2) and layout.valid_ratios.dtype == torch.float32
    assert torch.equal(layout.valid_ratios[0], torch.ones(3, 2))
    # (valid width / W, valid height / H) per level
    torch.testing.assert_close(layout.valid_ratios[1], torch.tensor([[0.5, 0.75], [2 / 3, 1.0], [0.5, 1.0]]))


def test_split_levels_undoes_the_flattening():
    masks = padded_levels()
    layout = TokenLayout.of(masks)
    for level, mask in zip(layout.split_levels(layout.padding_mask), masks):  # (N, S) -> (N, H_l, W_l)
        assert torch.equal(level, mask)
    values = torch.arange(32.0)
    levels = layout.split_levels(values)  # (S,) -> (H_l, W_l)
    assert [tuple(level.shape) for level in levels] == [(4, 6), (2, 3), (1, 2)]
    assert levels[1][1, 0] == 24 + 3  # row-major within a level
    assert torch.equal(torch.cat([level.flatten() for level in levels]), values)


def test_one_image_of_a_layout():
    layout = TokenLayout.of(padded_levels())
    second = layout.image(1)
    assert second.padding_mask.shape == (1, 32) and torch.equal(second.padding_mask[0], layout.padding_mask[1])
    assert torch.equal(second.valid_ratios[0], layout.valid_ratios[1])
    assert second.spatial_shapes is layout.spatial_shapes and second.level_start_index is layout.level_start_index


def test_selection_of_the_top_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [0.8, 0.2, 0.6, 0.4, 0.0]])
    selection = TokenSelection.top(scores, torch.tensor([3, 1]))
    assert selection.indices.tolist() == [[1, 4, 2], [0, 2, 3]]  # k = max count, best first
    assert selection.kept.tolist() == [[True, True, True], [True, False, False]]
    assert selection.token_mask(5).tolist() == [
        [False, True, True, False, True],
        [True, False, False, False, False],
    ]
    assert TokenSelection.top(scores, torch.tensor([6, 1])).indices.shape == (2, 5)  # k is at most S
    second = selection.image(1)
    assert second.indices.tolist() == [[0, 2, 3]] and second.counts.tolist() == [1]


SPARSE_ROLES = ["decoder"] * 6 + ["proposal"] + ["encoder_aux"] * 5
SPARSE_SLOTS = (HeadSlots(slice(0, 6), 6, slice(7, 12), False), 12, SPARSE_ROLES)
# HeadSlots(decoder heads, proposal head, encoder aux heads, shared), number of slots, roles of the registered heads
EXPECTED_SLOTS = {
    "deformable": (HeadSlots(slice(0, 6), None, slice(6, 6), True), 6, ["decoder"]),
    "deformable-topk-bbr": (HeadSlots(slice(0, 6), 6, slice(7, 7), False), 7, ["decoder"] * 6 + ["proposal"]),
    **{preset: SPARSE_SLOTS for preset in list_presets() if preset.startswith("sparse-rho")},
    "tiny": (HeadSlots(slice(0, 3), 3, slice(4, 6), False), 6, ["decoder"] * 3 + ["proposal"] + ["encoder_aux"] * 2),
    # tiny with 6 encoder layers: 5 encoder aux heads
    "tiny-ablation": (
        HeadSlots(slice(0, 3), 3, slice(4, 9), False),
        9,
        ["decoder"] * 3 + ["proposal"] + ["encoder_aux"] * 5,
    ),
}


@pytest.mark.parametrize("preset", list_presets())
def test_head_slots_of_each_preset(preset):
    slots = HeadSlots.of(get_preset(preset).model)
    expected, num_slots, roles = EXPECTED_SLOTS[preset]
    assert slots == expected
    assert slots.num_slots == num_slots
    assert slots.num_registered == len(roles) == (1 if slots.shared else num_slots)
    assert [slots.role(index) for index in range(slots.num_registered)] == roles


@pytest.mark.parametrize(
    ("preset", "official"),
    [
        ("deformable", "r50_deformable_detr"),
        ("deformable-topk-bbr", "r50_efficient_detr"),
        ("sparse-rho0.1", "r50_sparse_detr_rho_0.1"),
    ],
)
def test_head_slots_match_the_released_layout(preset, official):
    """The released files list every slot as ``class_embed.{i}`` and the encoder's heads again under
    ``transformer.encoder``, numbered from the first encoder aux slot."""
    slots = HeadSlots.of(get_preset(preset).model)
    keys = (OFFICIAL / f"keys_{official}.txt").read_text()
    assert len(set(re.findall(r"^class_embed\.(\d+)\.", keys, re.MULTILINE))) == slots.num_slots
    aliases = dict(line.split("\t") for line in (OFFICIAL / f"aliases_{official}.txt").read_text().splitlines())
    encoder = {alias: canonical for alias, canonical in aliases.items() if alias.startswith("transformer.encoder.")}
    indices = {int(re.search(r"_embed\.(\d+)\.", alias)[1]) for alias in encoder}
    assert indices == set(range(len(range(slots.num_slots)[slots.encoder_aux_heads])))
    for alias, canonical in encoder.items():
        head, index = re.search(r"(\w+_embed)\.(\d+)\.", alias).groups()
        assert canonical.startswith(f"{head}.{slots.encoder_aux_heads.start + int(index)}.")


DENSE = {"model.keep_ratio": 0.0, "model.use_enc_aux_loss": False}


@pytest.mark.parametrize(
    "overrides",
    [DENSE | {"model.two_stage": False, "model.with_box_refine": False}, DENSE, {}],
    ids=["plain", "topk-bbr", "sparse"],
)
def test_the_detector_registers_and_hands_out_the_slots_heads(overrides):
    torch.manual_seed(0)
    model = build_model(apply_overrides(get_preset("tiny"), overrides))
    slots = model.head_slots
    assert len(model.class_embed) == len(model.bbox_embed) == slots.num_registered
    class_heads, box_heads = model._heads()
    assert len(class_heads) == len(box_heads) == slots.num_slots
    registered = list(model.class_embed)
    expected = [registered[0]] * slots.num_slots if slots.shared else registered
    assert all(head is want for head, want in zip(class_heads, expected))
