"""Deformable encoder with optional token sparsification (SPEC §4.1, §4.6, §4.7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparse_detr.models.deformable_attention import MSDeformAttn


class EncoderLayer(nn.Module):
    """Post-norm layer: deformable attention over the full token map, then a ReLU FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        queries: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        value_map: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Refine ``queries`` (N, Lq, C) by attending to ``value_map`` (N, S, C).

        ``pos`` (N, Lq, C) and ``reference_points`` (N, Lq, L, 2) belong to the queries; with all tokens
        as queries, ``queries`` is ``value_map``.
        """
        attended = self.self_attn(
            queries + pos, reference_points, value_map, spatial_shapes, level_start_index, padding_mask
        )
        queries = self.norm1(queries + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(queries))))
        return self.norm2(queries + self.dropout3(ffn))


def encoder_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Each token's cell centre, normalized by its level's valid size, seen from every level.

    Args:
        spatial_shapes: (L, 2) int64 (H, W). valid_ratios: (N, L, 2) float32 (w, h).

    Returns:
        (N, S, L, 2) float32 (x, y); tokens in the padding have coordinates above 1.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=valid_ratios.device),
            torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=valid_ratios.device),
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)  # (N, H*W)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, S, ...) gathered at index (N, k) along dim 1 -> (N, k, ...)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_kept_rows(
    token_map: torch.Tensor, selected: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Write ``rows`` (N, k, C) into ``token_map`` (N, S, C) at ``selected`` (N, k), keeping for image i
    only its first ``counts[i]`` rows; the other selected tokens keep their current features."""
    index = selected[..., None].expand_as(rows)
    kept = torch.arange(selected.shape[1], device=selected.device)[None] < counts[:, None]  # (N, k)
    rows = torch.where(kept[..., None], rows, token_map.gather(1, index))
    return token_map.scatter(1, index, rows)


class SparseEncoder(nn.Module):
    """Stack of :class:`EncoderLayer` that encodes either every token or a selected subset.

    With a selection, the selected tokens' features are gathered once and refined layer by layer while
    the values stay the full token map, updated after every layer with the refined rows (SPEC §4.6).
    """

    def __init__(self, layer_factory, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_factory() for _ in range(num_layers))

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        mask_flatten: torch.Tensor,
        selected: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        aux_heads: tuple[Sequence[nn.Module], Sequence[nn.Module]] | None = None,
        proposals: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Encode the flattened multi-scale map.

        Args:
            src, pos: (N, S, C) token features and position (+ level) embeddings.
            spatial_shapes: (L, 2). level_start_index: (L,). valid_ratios: (N, L, 2).
            mask_flatten: (N, S) True on padding.
            selected: (N, k) tokens to encode, or None for all. counts: (N,) rows of ``selected`` that
                image i writes back (required with ``selected``).
            aux_heads: (class heads, box heads) applied to the encoded queries after every layer but
                the last; ``proposals`` (N, S, 4) are the logit-space anchors their boxes refine.

        Returns:
            memory (N, S, C), and per aux layer {pred_logits (N, k, C'), pred_boxes (N, k, 4)}.
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        memory = src
        if selected is not None:
            reference_points = _gather_rows(reference_points, selected)
            pos = _gather_rows(pos, selected)
            queries = _gather_rows(src, selected)
            if proposals is not None:
                proposals = _gather_rows(proposals, selected)
        aux_outputs = []
        for index, layer in enumerate(self.layers):
            if selected is None:
                memory = queries = layer(
                    memory, pos, reference_points, memory, spatial_shapes, level_start_index, mask_flatten
                )
            else:
                queries = layer(
                    queries, pos, reference_points, memory, spatial_shapes, level_start_index, mask_flatten
                )
                memory = scatter_kept_rows(memory, selected, queries, counts)
            if aux_heads is not None and index < len(self.layers) - 1:
                class_heads, box_heads = aux_heads
                aux_outputs.append(
                    {
                        "pred_logits": class_heads[index](queries),
                        "pred_boxes": (box_heads[index](queries) + proposals).sigmoid(),
                    }
                )
        return memory, aux_outputs
