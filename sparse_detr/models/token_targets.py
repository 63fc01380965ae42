"""Targets and losses of the scoring network from the ground-truth boxes: Focus-DETR's foreground supervision
(token ranking ``foreground``) and Salience-DETR's scale-independent salience (``salience``).

Both follow the released code (detrex ``projects/focus_detr/modeling/foreground_supervision.py``,
xiuqhou/Salience-DETR ``models/detectors/salience_detr.py``), which assigns objects to levels per token, as
FCOS does:

- level l has stride s_l = 8 * 2^l: every backbone gives its maps at strides 8, 16, 32 (see
  :mod:`sparse_detr.models.backbone`) and each extra level is a stride-2 convolution of the last;
- token (i, j) of a level covers pixels [s*i, s*(i+1)) x [s*j, s*(j+1)) of the resized image, and stands
  at its centre x = s * (j + 0.5), y = s * (i + 0.5);
- a token is inside a box when its distances l, t, r, b to the box's left, top, right and bottom sides
  are all > 0, and it is assigned to that box at level l when also max(l, t, r, b) is in the level's range
  (see :func:`level_ranges`), so one box can be assigned to several levels, by different tokens.

Tokens on batch padding get target 0 and are left out of the losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, sigmoid_focal_loss

from sparse_detr.models.token_layout import TokenLayout

FIRST_STRIDE = 8  # the stride of every backbone's first map
FOCAL_ALPHA = 0.25  # both references' focal loss
FOCAL_GAMMA = 2.0


def level_strides(num_levels: int) -> list[int]:
    """Pixels per token of each of ``num_levels`` levels: 8, 16, 32, then x2 per extra stride-2 level."""
    return [FIRST_STRIDE * 2**level for level in range(num_levels)]


def level_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """The range (lower, upper] of max(l, t, r, b) that assigns a token to a box, per level.

    Level l takes (4 s_l, 8 s_l], the first level everything below (lower -1) and the last everything
    above (upper inf). For the references' 4 levels of strides 8..64 these are their ranges
    (-1, 64], (64, 128], (128, 256], (256, inf); other level counts extend the rule.
    """
    ranges = [(4.0 * stride, 8.0 * stride) for stride in strides]
    ranges[0] = (-1.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], math.inf)
    return ranges


def _token_geometry(
    level_shapes: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token's centre (S, 2) (x, y) in pixels, and the lower and upper bounds (S,) of its level's range."""
    strides = level_strides(len(level_shapes))
    centres, lower, upper = [], [], []
    for (height, width), stride, (low, high) in zip(level_shapes, strides, level_ranges(strides), strict=True):
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=dtype, device=device),
            torch.arange(width, dtype=dtype, device=device),
            indexing="ij",
        )
        # (H, W, 2) -> (H * W, 2), rows first as the levels are flattened
        centres.append(((torch.stack([xs, ys], -1) + 0.5) * stride).view(-1, 2))
        lower.append(torch.full((height * width,), low, dtype=dtype, device=device))
        upper.append(torch.full((height * width,), high, dtype=dtype, device=device))
    return torch.cat(centres), torch.cat(lower), torch.cat(upper)


def _pixel_boxes(boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """(T, 4) normalized cxcywh boxes of an image of ``image_size`` (h, w) -> (T, 4) xyxy in its pixels."""
    height, width = image_size.to(boxes.dtype).unbind()
    return box_convert(boxes, "cxcywh", "xyxy") * torch.stack([width, height, width, height])


def _side_distances(centres: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(S, T, 4) distances l, t, r, b from each token centre (S, 2) to the sides of each xyxy box (T, 4)."""
    x, y = centres[:, None, 0], centres[:, None, 1]  # (S, 1) each
    return torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)


def _inside_and_assigned(
    distances: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, T) bool each: token inside box; and inside it with max(l, t, r, b) in the token's level range."""
    inside = distances.amin(-1) > 0
    largest = distances.amax(-1)
    in_level = (largest > lower[:, None]) & (largest <= upper[:, None])
    return inside, inside & in_level


def _salience(centres: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(S, T) 1 - sqrt(((x - cx) / w)^2 + ((y - cy) / h)^2) of each token centre (S, 2) in each xyxy box (T, 4)."""
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    offsets = (centres[:, None] - box_centres) / sizes  # (S, T, 2)
    return 1 - offsets.square().sum(-1).sqrt()


def _box_targets(
    boxes: Sequence[torch.Tensor], image_sizes: torch.Tensor, layout: TokenLayout, salience: bool
) -> torch.Tensor:
    """The (N, S) target map of :func:`foreground_targets` or, with ``salience``, :func:`salience_targets`."""
    dtype = boxes[0].dtype
    device = layout.padding_mask.device
    centres, lower, upper = _token_geometry(layout.level_shapes, dtype, device)
    maps = []
    for image_boxes, image_size in zip(boxes, image_sizes, strict=True):
        target = torch.zeros(layout.num_tokens, dtype=dtype, device=device)
        if len(image_boxes):
            pixel_boxes = _pixel_boxes(image_boxes.to(device, dtype), image_size.to(device))
            inside, assigned = _inside_and_assigned(_side_distances(centres, pixel_boxes), lower, upper)
            positive = assigned.any(-1)
            if salience:
                # the best salience over every box the token is inside, also boxes of other levels
                values = _salience(centres, pixel_boxes).masked_fill(~inside, 0).amax(-1)
                target = values.masked_fill(~positive, 0)
            else:
                target = positive.to(dtype)
        maps.append(target)
    return torch.stack(maps).masked_fill(layout.padding_mask, 0)


@torch.no_grad()
def foreground_targets(boxes: Sequence[torch.Tensor], image_sizes: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Focus-DETR's foreground label of every token: 1 when it is assigned to some box at its level.

    Args:
        boxes: per image (T_i, 4) normalized cxcywh boxes of the resized, unpadded image.
        image_sizes: (N, 2) (h, w) of each resized, unpadded image.
        layout: the batch's token layout (level shapes of the padded batch, padding).

    Returns:
        (N, S) in {0, 1}, in the boxes' dtype; 0 on padded tokens.
    """
    return _box_targets(boxes, image_sizes, layout, salience=False)


@torch.no_grad()
def salience_targets(boxes: Sequence[torch.Tensor], image_sizes: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Salience-DETR's scale-independent salience of every token.

    A token assigned to some box at its level gets the largest 1 - sqrt(((x - cx) / w)^2 + ((y - cy) / h)^2)
    over all boxes it is inside (1 at a box's centre, 1 - sqrt(1/2) at its corners); every other token 0.
    Arguments as :func:`foreground_targets`.

    Returns:
        (N, S) in [0, 1], in the boxes' dtype; 0 on padded tokens.
    """
    return _box_targets(boxes, image_sizes, layout, salience=True)


def foreground_loss(logits: torch.Tensor, targets: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Focus-DETR's loss: sigmoid focal loss (α 0.25, γ 2) summed over each image's tokens and divided by
    its positive tokens (at least 1), averaged over the images.

    Args:
        logits: (N, S) scoring network logits. targets: (N, S) of :func:`foreground_targets`.
        padding_mask: (N, S) True on padded tokens, which are left out.
    """
    loss = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none")
    positives = (targets > 0).sum(1).clamp(min=1)
    return (loss.masked_fill(padding_mask, 0).sum(1) / positives).mean()


def salience_loss(logits: torch.Tensor, targets: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Salience-DETR's loss: focal loss with soft targets t, (α t (1 - p)^γ + (1 - α) (1 - t) p^γ) * BCE(p, t)
    with p = sigmoid(logit), α 0.25, γ 2, summed over the batch's tokens and divided by the batch's tokens
    with t > 0 (at least 1).

    Args:
        logits: (N, S) scoring network logits. targets: (N, S) of :func:`salience_targets`.
        padding_mask: (N, S) True on padded tokens, which are left out.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    weight = FOCAL_ALPHA * targets * (1 - prob) ** FOCAL_GAMMA + (1 - FOCAL_ALPHA) * (1 - targets) * prob**FOCAL_GAMMA
    loss = weight * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.masked_fill(padding_mask, 0).sum() / (targets > 0).sum().clamp(min=1)
