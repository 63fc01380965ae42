"""Pure-PyTorch multi-scale deformable attention (the ``"pytorch"`` backend).

This is the grid_sample form of the op used by the reference implementation (SPEC §3). It runs on
any device and dtype and is the ground truth the compiled kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear multi-scale sampling followed by the attention-weighted sum.

    Args:
        value: (N, S, M, D) values of all levels, flattened row-major and concatenated.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of every level.
        level_start_index: (L,) int64, offset of every level in S (unused: derived from the shapes).
        sampling_locations: (N, Lq, M, L, P, 2) normalized (x, y) of the padded maps.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    del level_start_index  # implied by spatial_shapes; kept for the common signature
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's grid lives in [-1, 1] with align_corners=False: pixel = loc * W - 0.5.
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # (N*M, D, Lq, L*P) weighted sum over L*P -> (N, M*D, Lq)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()
