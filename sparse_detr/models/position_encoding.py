"""Sine position encodings of feature maps (SPEC §2) and of query boxes (SPEC §5).

Both are computed in float32 whatever the model's dtype, as the reference implementation does
(SPEC §11), so a float64 model reproduces it exactly.
"""

from __future__ import annotations

import math

import torch


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """(num_feats,) float32 divisors; features 2i and 2i+1 share one frequency."""
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (index // 2) / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., F): sin on even feature indices, cos on odd ones."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding(
    mask: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0
) -> torch.Tensor:
    """Normalized 2-d sine encoding of the valid (unpadded) area of a feature map.

    Args:
        mask: (N, H, W) bool, True on padding.
        num_feats: features per axis; the output has ``2 * num_feats`` channels, y first then x.

    Returns:
        (N, 2 * num_feats, H, W) float32.
    """
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_feats, temperature, mask.device)
    pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)  # (N, H, W, F)
    pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_position_encoding(
    box_logits: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0
) -> torch.Tensor:
    """Sine encoding of boxes given in logit space (two-stage query positions).

    Args:
        box_logits: (N, Q, 4) unnormalized (inverse-sigmoid) boxes.

    Returns:
        (N, Q, 4 * num_feats), features of cx, cy, w, h in that order.
    """
    dim_t = _frequencies(num_feats, temperature, box_logits.device)
    angles = box_logits.sigmoid()[..., None] * (2 * math.pi) / dim_t  # (N, Q, 4, F)
    return _interleave_sin_cos(angles).flatten(2)
