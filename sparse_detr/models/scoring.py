"""Token saliency scoring and selection for the sparse encoder (SPEC §4.3–4.5)."""

from __future__ import annotations

import torch
from torch import nn


class ScoringNetwork(nn.Module):
    """Predicts one saliency logit per encoder token (the reference's ``enc_mask_predictor``).

    Half of the hidden channels are mean-pooled over all tokens of the image (padded ones included,
    as in the reference) so each score also sees global context.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, S, C) scoring input -> (N, S) logits."""
        hidden = self.layer1(tokens)
        local, global_ = hidden.chunk(2, dim=-1)
        global_ = global_.mean(dim=1, keepdim=True).expand_as(local)
        return self.layer2(torch.cat([local, global_], dim=-1)).squeeze(-1)


def fill_padded_scores(scores: torch.Tensor, mask_flatten: torch.Tensor) -> torch.Tensor:
    """Replace padded tokens' scores by the minimum over the whole batch so they rank last.

    Args:
        scores: (N, S). mask_flatten: (N, S) True on padding.
    """
    return scores.masked_fill(mask_flatten, scores.min())


def keep_counts(mask_flatten: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(N,) int64 tokens to encode per image: ``int(valid_tokens * keep_ratio) + 1``.

    The product is taken in float32 like the reference, so counts agree with it at rounding edges.
    """
    valid = (~mask_flatten).sum(dim=1)
    return (valid.to(torch.float32) * keep_ratio).to(torch.int64) + 1


def select_tokens(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(N, k) indices of the highest scores, best first, k = min(max(counts), S).

    All images share k; image i uses only its first ``counts[i]`` indices (SPEC §4.5).
    """
    k = min(int(counts.max()), scores.shape[1])
    return scores.topk(k, dim=1).indices
