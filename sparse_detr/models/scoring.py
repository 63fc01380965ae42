"""Token saliency scoring and how many tokens the sparse encoder keeps (SPEC §4.3–4.5); which ones:
:meth:`~sparse_detr.models.token_layout.TokenSelection.top`."""

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


def fill_padded_scores(scores: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Replace padded tokens' scores by the minimum over the whole batch so they rank last.

    Args:
        scores: (N, S). padding_mask: (N, S) True on padding.
    """
    return scores.masked_fill(padding_mask, scores.min())


def keep_counts(padding_mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(N,) int64 tokens to encode per image: ``int(valid_tokens * keep_ratio) + 1``.

    The product is taken in float32 like the reference, so counts agree with it at rounding edges.
    """
    valid = (~padding_mask).sum(dim=1)
    return (valid.to(torch.float32) * keep_ratio).to(torch.int64) + 1


def most_kept(num_tokens: int, keep_ratio: float) -> int:
    """An upper bound of :func:`keep_counts` from the token-map size S alone (also a symbolic size while
    traced): ``int(S * keep_ratio) + 2``, one more than the largest count for float32 rounding."""
    return torch.sym_int(num_tokens * keep_ratio) + 2  # sym_int: no guard on a symbolic S
