"""Detections from model outputs (SPEC §7)."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

MAX_DETECTIONS = 100  # per image: what COCO evaluation counts (maxDets=100)


def top_detections(
    logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor, top_k: int = MAX_DETECTIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``top_k`` best (query, class) pairs of each image, batched (also the exported graph's tail).

    Args:
        logits: (N, Q, C). boxes: (N, Q, 4) cxcywh in [0, 1].
        target_sizes: (N, 2) (height, width) of each original image.
        top_k: detections per image (at most Q * C).

    Returns:
        scores (N, top_k), labels (N, top_k) int64, boxes (N, top_k, 4) xyxy in pixels.
    """
    num_classes = logits.shape[2]
    # one score per (query, class) pair: (N, Q * C)
    scores, index = logits.sigmoid().flatten(1).topk(top_k, dim=1)
    queries, labels = index // num_classes, index % num_classes
    boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, queries[..., None].expand(-1, -1, 4))
    height, width = target_sizes.unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], 1)[:, None].to(boxes)
    return scores, labels, boxes


@torch.no_grad()
def postprocess(
    outputs: dict, target_sizes: torch.Tensor | list[tuple[int, int]], top_k: int = MAX_DETECTIONS
) -> list[dict[str, torch.Tensor]]:
    """:func:`top_detections` of model outputs with ``pred_logits`` and ``pred_boxes``, per image.

    Returns:
        per image {scores (top_k,), labels (top_k,) int64, boxes (top_k, 4) xyxy in pixels}.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    target_sizes = torch.as_tensor(target_sizes, device=logits.device)
    if target_sizes.shape != (len(logits), 2):
        raise ValueError(f"target_sizes must be ({len(logits)}, 2) (height, width), got {tuple(target_sizes.shape)}")
    scores, labels, boxes = top_detections(logits, boxes, target_sizes, top_k)
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
