"""Multi-scale deformable attention module (Zhu et al., Deformable DETR; SPEC §3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_detr.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its reference.

    Parameter names and initialization follow the reference implementation so released checkpoints
    load unchanged: ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a star of M directions, the k-th point k+1 cells out; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        # (M, 2) -> (M, L, P, 2), point p scaled by p + 1
        grid = directions[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        return_sampling: bool = False,
        backend: str | None = None,
    ):
        """Attend from ``query`` to the multi-scale map ``input_flatten``.

        Args:
            query: (N, Lq, C) query features (position embedding already added).
            reference_points: (N, Lq, L, 2) normalized (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h).
            input_flatten: (N, S, C) all levels' tokens, flattened and concatenated.
            spatial_shapes: (L, 2) int64 (H, W) per level.
            level_start_index: (L,) int64.
            padding_mask: (N, S) True on padded tokens, whose values are zeroed.
            return_sampling: also return the sampling locations (N, Lq, M, L, P, 2) and the attention
                weights (N, Lq, M, L, P), which the decoder attention map is built from.
            backend: op backend, see :func:`sparse_detr.ops.ms_deform_attn`.

        Returns:
            (N, Lq, C), or ``(output, sampling_locations, attention_weights)``.
        """
        n, lq, _ = query.shape
        m, num_levels, num_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, input_flatten.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, num_levels, num_points, 2)
        # softmax over the L*P samples of each head: (N, Lq, M, L*P) -> (N, Lq, M, L, P)
        weights = self.attention_weights(query).view(n, lq, m, num_levels * num_points)
        weights = weights.softmax(-1).view(n, lq, m, num_levels, num_points)
        if reference_points.shape[-1] == 2:
            # offsets are in cells of each level: divide by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)
            # reference + offsets / normalizer in one pass (the same rounding: addcdiv's value is 1)
            locations = torch.addcdiv(
                reference_points[:, :, None, :, None, :], offsets, normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            # offsets are in units of the reference box: half its size spread over the points
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend)
        output = self.output_proj(output)
        if return_sampling:
            return output, locations, weights
        return output
