"""Hungarian matching of predictions to ground-truth boxes (SPEC §6)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from sparse_detr.errors import NonFiniteError


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimizing a focal class + L1 + GIoU cost.

    Unmatched queries are trained as background. Images with more targets than queries match only
    as many targets as there are queries.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def focal_class_cost(self, prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Focal loss of predicting each target's class as positive minus as negative.

        Args:
            prob: (B, C) sigmoid probabilities of B predictions.
            labels: (T,) int64 target classes.

        Returns:
            (B, T).
        """
        alpha, gamma = self.focal_alpha, self.focal_gamma
        prob = prob[:, labels]
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4) normalized cxcywh.
            targets: N dicts with ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) normalized cxcywh.

        Returns:
            N pairs (query indices, target indices), int64 of length min(Q, T_i), on the CPU.
        """
        n, num_queries = outputs["pred_logits"].shape[:2]
        # all images' costs in one batch: (N*Q, sum T_i), then split per image
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        boxes = outputs["pred_boxes"].flatten(0, 1)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.dtype)

        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        # summed in the reference's order, so that near-ties resolve the same way
        cost = (
            self.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
            + self.cost_class * self.focal_class_cost(prob, target_labels)
            - self.cost_giou * giou
        )
        cost = cost.view(n, num_queries, -1).cpu()
        if not bool(torch.isfinite(cost).all()):
            raise NonFiniteError("non-finite matching costs: the predictions hold NaN or infinite values")

        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for i, image_cost in enumerate(cost.split(sizes, -1)):
            query_index, target_index = linear_sum_assignment(image_cost[i])
            indices.append(
                (torch.as_tensor(query_index, dtype=torch.int64), torch.as_tensor(target_index, dtype=torch.int64))
            )
        return indices
