"""The ``foreground`` (Focus-DETR) and ``salience`` (Salience-DETR) token rankings: their targets from the boxes,
their losses, and a tiny model trained with each."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torchvision.ops import sigmoid_focal_loss

from sparse_detr.models import build_criterion, pad_images
from sparse_detr.models.scoring import fill_padded_scores
from sparse_detr.models.token_layout import TokenLayout
from sparse_detr.models.token_targets import (
    foreground_loss,
    foreground_targets,
    level_ranges,
    level_strides,
    salience_loss,
    salience_targets,
)

# the references' four levels (strides 8..64) and their limit_range on max(l, t, r, b)
STRIDES = (8, 16, 32, 64)
RANGES = ((-1, 64), (64, 128), (128, 256), (256, 99999))
PADDED = (256, 256)  # (H, W) of every test batch


def batch_layout(sizes: list[tuple[int, int]]) -> TokenLayout:
    """The layout of images of these (h, w) sizes, multiples of 64, padded to :data:`PADDED`."""
    masks = []
    for stride in STRIDES:
        mask = torch.ones(len(sizes), PADDED[0] // stride, PADDED[1] // stride, dtype=torch.bool)
        for image, (height, width) in enumerate(sizes):
            mask[image, : height // stride, : width // stride] = False
        masks.append(mask)
    return TokenLayout.of(masks)


def token(level: int, row: int, col: int) -> int:
    """Index of token (row, col) of ``level`` in the flattened map of a :data:`PADDED` batch."""
    widths = [PADDED[1] // stride for stride in STRIDES]
    heights = [PADDED[0] // stride for stride in STRIDES]
    start = sum(heights[level_] * widths[level_] for level_ in range(level))
    return start + row * widths[level] + col


def paper_targets(boxes: list[list[float]], size: tuple[int, int], padding: list[bool]) -> tuple[list, list]:
    """Foreground and salience target of every token of one image, token by token in plain Python.

    A token at the centre (x, y) of its cell is positive when it is strictly inside a box whose largest
    distance from the token to the box's sides falls in the token's level range; its salience is
    1 - sqrt(((x - cx) / w)^2 + ((y - cy) / h)^2), the best over the boxes it is inside.
    """
    height, width = size
    pixel_boxes = [(cx * width, cy * height, w * width, h * height) for cx, cy, w, h in boxes]
    foreground, salience = [], []
    for stride, (lower, upper) in zip(STRIDES, RANGES):
        for row in range(PADDED[0] // stride):
            for col in range(PADDED[1] // stride):
                x, y = stride * col + stride / 2, stride * row + stride / 2
                positive, best = False, 0.0
                for cx, cy, w, h in pixel_boxes:
                    sides = (x - (cx - w / 2), y - (cy - h / 2), cx + w / 2 - x, cy + h / 2 - y)
                    if min(sides) > 0:
                        best = max(best, 1 - math.sqrt(((x - cx) / w) ** 2 + ((y - cy) / h) ** 2))
                        positive |= lower < max(sides) <= upper
                foreground.append(1.0 if positive else 0.0)
                salience.append(best if positive else 0.0)
    foreground = [0.0 if pad else value for value, pad in zip(foreground, padding)]
    salience = [0.0 if pad else value for value, pad in zip(salience, padding)]
    return foreground, salience


def targets_of(boxes: list[list[list[float]]], sizes: list[tuple[int, int]]):
    """foreground_targets and salience_targets of a batch: per image normalized cxcywh boxes, (h, w) sizes."""
    layout = batch_layout(sizes)
    box_tensors = [torch.tensor(image, dtype=torch.float64).reshape(-1, 4) for image in boxes]
    image_sizes = torch.tensor(sizes)
    return (
        layout,
        foreground_targets(box_tensors, image_sizes, layout),
        salience_targets(box_tensors, image_sizes, layout),
    )


# 256 x 256 px: a 100 px box centred at (128, 128): its tokens' largest side distance runs from 50 to 100,
# so its central tokens are level 0's (<= 64) and the rest level 1's (64..128]
STRADDLING = [[0.5, 0.5, 100 / 256, 100 / 256]]
# a 200 px box with a 32 px box inside it, centred at (120, 128)
NESTED = [[0.5, 0.5, 200 / 256, 200 / 256], [120 / 256, 0.5, 32 / 256, 32 / 256]]
# two 80 px boxes, x 60..140 and 100..180, overlapping on x in (100, 140)
OVERLAPPING = [[100 / 256, 0.5, 80 / 256, 80 / 256], [140 / 256, 0.5, 80 / 256, 80 / 256]]

CASES = {
    "straddling": ([STRADDLING], [(256, 256)]),
    "nested": ([NESTED], [(256, 256)]),
    "overlapping": ([OVERLAPPING], [(256, 256)]),
    # image 1 (128 x 192) is padded by image 0; its box, x 128..192 and y 32..96, ends where the padding starts
    "padded": ([STRADDLING, [[160 / 192, 0.5, 64 / 192, 0.5]]], [(256, 256), (128, 192)]),
    # a box drawn past the image's right edge (x 170..210 of 192) covers padded tokens
    "past the edge": ([STRADDLING, [[190 / 192, 0.5, 40 / 192, 0.5]]], [(256, 256), (128, 192)]),
    "no boxes": ([STRADDLING, []], [(256, 256), (192, 128)]),
}


@pytest.mark.parametrize("case", CASES)
def test_targets_follow_the_rules_token_by_token(case):
    boxes, sizes = CASES[case]
    layout, foreground, salience = targets_of(boxes, sizes)
    for image, (image_boxes, size) in enumerate(zip(boxes, sizes)):
        expected_foreground, expected_salience = paper_targets(image_boxes, size, layout.padding_mask[image].tolist())
        assert foreground[image].tolist() == expected_foreground
        assert salience[image].tolist() == pytest.approx(expected_salience, abs=1e-12)


def test_level_ranges_are_the_references_for_four_levels():
    assert level_strides(4) == list(STRIDES)
    assert level_ranges(level_strides(4)) == [(-1, 64), (64, 128), (128, 256), (256, math.inf)]
    assert level_ranges(level_strides(3)) == [(-1, 64), (64, 128), (128, math.inf)]


def test_a_box_straddling_two_levels_is_split_between_them_by_token():
    _, foreground, salience = targets_of(*CASES["straddling"])
    # level 0 token (15, 15) at (124, 124): sides 46, 46, 54, 54 -> level 0 (<= 64)
    assert foreground[0, token(0, 15, 15)] == 1
    assert salience[0, token(0, 15, 15)].item() == pytest.approx(1 - math.hypot(4 / 100, 4 / 100))
    # level 0 token (10, 15) at (124, 84): bottom side 94 away -> not level 0 but inside the box
    assert foreground[0, token(0, 10, 15)] == 0 and salience[0, token(0, 10, 15)] == 0
    # level 1 token (5, 7) at (120, 88): bottom side 90 away -> level 1
    assert foreground[0, token(1, 5, 7)] == 1
    assert salience[0, token(1, 5, 7)].item() == pytest.approx(1 - math.hypot(8 / 100, 40 / 100))
    # level 1 token (7, 7) at (120, 120): sides at most 58 away -> level 0's
    assert foreground[0, token(1, 7, 7)] == 0
    assert foreground[0, 1024:1280].sum() > 0 and foreground[0, 1280:].sum() == 0  # nothing on levels 2, 3


def test_nested_boxes_take_the_best_salience_of_every_box_the_token_is_in():
    _, foreground, salience = targets_of(*CASES["nested"])
    # level 0 token (15, 16) at (132, 124): the small box's (sides 28, 12, 4, 20) assigns it to level 0;
    # its salience is the big box's, whose centre it nearly is, though the big box is not level 0's
    small = 1 - math.hypot(12 / 32, 4 / 32)
    big = 1 - math.hypot(4 / 200, 4 / 200)
    assert foreground[0, token(0, 15, 16)] == 1
    assert salience[0, token(0, 15, 16)].item() == pytest.approx(max(small, big)) == pytest.approx(big)
    # level 1 token (7, 8) at (136, 120), on the small box's right side: the big box (sides 108, 92, 92, 108)
    # makes it level 1's
    assert foreground[0, token(1, 7, 8)] == 1
    assert salience[0, token(1, 7, 8)].item() == pytest.approx(1 - math.hypot(8 / 200, 8 / 200))


def test_overlapping_boxes_take_the_larger_salience():
    _, foreground, salience = targets_of(*CASES["overlapping"])
    # level 0 token (15, 14) at (116, 124), in both: sides 56, 36, 24, 44 and 16, 36, 64, 44, both level 0
    left, right = 1 - math.hypot(16 / 80, 4 / 80), 1 - math.hypot(24 / 80, 4 / 80)
    assert foreground[0, token(0, 15, 14)] == 1
    assert salience[0, token(0, 15, 14)].item() == pytest.approx(max(left, right)) == pytest.approx(left)
    # level 1 token (7, 8) at (136, 120), in both: the left box (sides 76, 32, 4, 48) makes it level 1's, the
    # right one (36, 32, 44, 48) would not, yet gives the larger salience
    left, right = 1 - math.hypot(36 / 80, 8 / 80), 1 - math.hypot(4 / 80, 8 / 80)
    assert foreground[0, token(1, 7, 8)] == 1
    assert salience[0, token(1, 7, 8)].item() == pytest.approx(right)
    assert right > left


def test_padded_tokens_get_no_target_and_boxes_scale_by_their_own_image():
    layout, foreground, salience = targets_of(*CASES["padded"])
    padding = layout.padding_mask[1]
    assert padding.any() and not foreground[1][padding].any() and not salience[1][padding].any()
    # x 128..192, y 32..96 of the 192 px wide image (scaled by 256, it would reach into the padding):
    # level 0 columns 16..23 of rows 4..11, the last column before the padding
    level0 = foreground[1, :1024].view(32, 32)  # (S,) -> level 0's (H, W)
    expected = torch.zeros(32, 32, dtype=level0.dtype)
    expected[4:12, 16:24] = 1
    assert torch.equal(level0, expected)


def test_an_image_without_boxes_is_all_negative():
    _, foreground, salience = targets_of(*CASES["no boxes"])
    assert not foreground[1].any() and not salience[1].any()
    assert foreground[0].any()


# ---------------------------------------------------------------- losses


def focal_term(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Salience-DETR's focal loss of one token with a soft target, written out."""
    p = 1 / (1 + math.exp(-logit))
    weight = alpha * target * (1 - p) ** gamma + (1 - alpha) * (1 - target) * p**gamma
    return -weight * (target * math.log(p) + (1 - target) * math.log(1 - p))


LOGITS = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [-0.5, 1.5, -2.0, 0.0, 3.0]], dtype=torch.float64)
PADDING = torch.tensor([[False, False, False, False, False], [False, False, False, True, True]])


def test_foreground_loss_is_focal_over_each_image_positives_averaged():
    targets = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    focal = sigmoid_focal_loss(LOGITS, targets, alpha=0.25, gamma=2.0, reduction="none")
    expected = (focal[0].sum() / 2 + focal[1, :3].sum() / 1) / 2  # image 1: no positive -> / 1; padding left out
    assert foreground_loss(LOGITS, targets, PADDING).item() == pytest.approx(expected.item(), rel=1e-12)
    by_hand = (sum(focal_term(LOGITS[0, k].item(), targets[0, k].item()) for k in range(5)) / 2) / 2
    by_hand += sum(focal_term(LOGITS[1, k].item(), 0.0) for k in range(3)) / 2
    assert foreground_loss(LOGITS, targets, PADDING).item() == pytest.approx(by_hand, rel=1e-12)


def test_salience_loss_is_soft_focal_over_the_batch_positives():
    targets = torch.tensor([[0.9, 0, 0.4, 0, 0], [0, 0.7, 0, 0, 0]], dtype=torch.float64)
    expected = sum(
        focal_term(LOGITS[i, k].item(), targets[i, k].item()) for i in range(2) for k in range(5) if not PADDING[i, k]
    )
    assert salience_loss(LOGITS, targets, PADDING).item() == pytest.approx(expected / 3, rel=1e-12)
    # binary targets: torchvision's focal loss
    binary = (targets > 0).double()
    focal = sigmoid_focal_loss(LOGITS, binary, alpha=0.25, gamma=2.0, reduction="none").masked_fill(PADDING, 0)
    assert salience_loss(LOGITS, binary, PADDING).item() == pytest.approx(focal.sum().item() / 3, rel=1e-12)


def test_losses_ignore_padded_logits():
    targets = torch.tensor([[1.0, 0, 0.5, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float64)
    moved = LOGITS.masked_fill(PADDING, 50.0)
    for loss in (foreground_loss, salience_loss):
        assert loss(moved, targets, PADDING).item() == loss(LOGITS, targets, PADDING).item()


# ---------------------------------------------------------------- the rankings in a model

TRAIN_TARGETS = [
    {
        "labels": torch.tensor([1, 2]),
        "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.5], [0.7, 0.5, 0.5, 0.8]]),
        "size": torch.tensor([64, 128]),
    },
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.6]]), "size": torch.tensor([64, 64])},
]


@pytest.mark.parametrize("ranking", ["foreground", "salience"])
def test_a_tiny_model_trains_its_scoring_network_on_the_ranking(ranking):
    model = tiny_model({"model.token_ranking": ranking})
    criterion = build_criterion(model.config)
    assert criterion.weight_dict["loss_mask_prediction"] == {"foreground": 1.5, "salience": 2.0}[ranking]
    scorer = model.transformer.enc_mask_predictor
    raw_scores = []
    handle = scorer.register_forward_hook(lambda module, args, output: raw_scores.append(output))
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images(
        [torch.randn(3, 64, 128, generator=generator), torch.randn(3, 64, 64, generator=generator)]
    )
    outputs = model(images, mask)
    handle.remove()

    # the strides the targets assume are the model's: image 0 (64 x 128) fills ceil(64 / s) x ceil(128 / s) maps
    layout, selection = outputs["layout"], outputs["selection"]
    strides = level_strides(len(layout.level_shapes))
    assert layout.level_shapes == tuple((math.ceil(64 / stride), math.ceil(128 / stride)) for stride in strides)
    # the selection ranks the scoring network's scores
    assert torch.equal(outputs["token_scores"], fill_padded_scores(raw_scores[0], layout.padding_mask))
    assert torch.equal(selection.indices, outputs["token_scores"].topk(selection.indices.shape[1], dim=1).indices)

    losses = criterion(outputs, TRAIN_TARGETS)
    assert torch.isfinite(losses["loss_mask_prediction"]) and losses["loss_mask_prediction"] > 0
    others = sum(
        weight * losses[name] for name, weight in criterion.weight_dict.items() if name != "loss_mask_prediction"
    )
    others.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in scorer.parameters())
    before = [p.detach().clone() for p in scorer.parameters()]
    (criterion.weight_dict["loss_mask_prediction"] * losses["loss_mask_prediction"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.parameters())
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, scorer.parameters()))


def test_box_rankings_need_the_image_sizes():
    model = tiny_model({"model.token_ranking": "salience"})
    outputs = model(*pad_images([torch.randn(3, 64, 64)]))
    target = {key: value for key, value in TRAIN_TARGETS[1].items() if key != "size"}
    with pytest.raises(KeyError, match="'size'"):
        build_criterion(model.config)(outputs, [target])
