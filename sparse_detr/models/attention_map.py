"""Decoder attention map (DAM): how much decoder cross-attention lands on each encoder token (SPEC §6).

The DAM is the pseudo ground truth of Sparse DETR's scoring network and the basis of the coverage
metrics; the visualizer draws it too.
"""

from __future__ import annotations

import torch

from sparse_detr.models.token_layout import TokenLayout, TokenSelection

# The four integer corners around a point, as (dx, dy) offsets from its floor.
_CORNER_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


@torch.no_grad()
def decoder_attention_map(
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    layout: TokenLayout,
    fill_padding: bool = False,
) -> torch.Tensor:
    """Sum the decoder's attention over all layers, queries, heads and points onto the tokens.

    Each sampling location spreads its attention weight over the four integer pixel corners around
    ``(loc_x * W_l, loc_y * H_l)`` with bilinear weights; corners outside the level map are dropped.
    As in the reference there is no -0.5 shift here, unlike the sampling of the attention op itself.

    Args:
        sampling_locations: (N, D, Q, M, L, P, 2) normalized (x, y) of the decoder cross-attention.
        attention_weights: (N, D, Q, M, L, P).
        layout: the layout of the tokens attended to.
        fill_padding: fill the padded tokens by :func:`fill_padded_tokens`.

    Returns:
        (N, S) in the dtype of ``attention_weights``; carries no gradient.
    """
    spatial_shapes = layout.spatial_shapes  # (L, 2) (H, W)
    dtype = attention_weights.dtype
    n = attention_weights.shape[0]
    heights = spatial_shapes[:, 0].view(-1, 1, 1)  # (L, 1, 1), broadcasts over (L, P, corner)
    widths = spatial_shapes[:, 1].view(-1, 1, 1)
    level_start = layout.level_start_index.view(-1, 1, 1)

    pixels = sampling_locations.to(dtype) * spatial_shapes.flip(-1).to(dtype)[:, None, :]  # (..., L, P, 2)
    floor = pixels.floor()
    frac = pixels - floor
    offsets = torch.tensor(_CORNER_OFFSETS, device=pixels.device)  # (4, 2)
    corners = floor.long()[..., None, :] + offsets  # (..., L, P, 4, 2)
    # bilinear weight of a corner: frac along the axes it is offset on, 1 - frac along the others
    bilinear = torch.where(offsets.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(-1)  # (..., L, P, 4)

    x, y = corners.unbind(-1)
    inside = (x >= 0) & (x < widths) & (y >= 0) & (y < heights)
    token_index = torch.where(inside, level_start + y * widths + x, 0)
    contribution = attention_weights[..., None] * bilinear * inside

    attention_map = torch.zeros(n, layout.num_tokens, dtype=dtype, device=attention_weights.device)
    # (N, D, Q, M, L, P, 4) -> (N, D*Q*M*L*P*4): every corner of every sample, added onto its token
    attention_map.scatter_add_(1, token_index.reshape(n, -1), contribution.reshape(n, -1))
    if fill_padding:
        attention_map = fill_padded_tokens(attention_map, layout.padding_mask)
    return attention_map


def fill_padded_tokens(attention_map: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Give padded tokens (the minimum of the whole batch's map) - 1, so they rank below every token.

    Args:
        attention_map: (N, S), padded tokens included in the minimum, as in the reference.
        padding_mask: (N, S) True on padded tokens.
    """
    return attention_map.masked_fill(padding_mask, attention_map.min() - 1)


@torch.no_grad()
def attention_coverage(
    attention_map: torch.Tensor, selection: TokenSelection, layout: TokenLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of each image's DAM mass that falls on the tokens it keeps, overall and per level.

    Args:
        attention_map: (N, S) DAM without the padded-token fill.

    Returns:
        overall (N,) and per level (N, L); a level without any mass counts as 0 covered.
    """
    covered = attention_map * selection.token_mask(layout.num_tokens).to(attention_map.dtype)

    tiny = torch.finfo(attention_map.dtype).tiny
    overall = covered.sum(1) / attention_map.sum(1).clamp_min(tiny)
    level_sizes = layout.level_sizes
    hits = torch.stack([level.sum(1) for level in covered.split(level_sizes, 1)], dim=1)  # (N, L)
    totals = torch.stack([level.sum(1) for level in attention_map.split(level_sizes, 1)], dim=1)
    per_level = hits / totals.clamp_min(tiny)
    return overall, per_level
