"""Deformable encoder with optional token sparsification (SPEC §4.1, §4.6, §4.7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparse_detr.models.deformable_attention import MSDeformAttn
from sparse_detr.models.outputs import Detections
from sparse_detr.models.token_layout import TokenLayout, TokenSelection


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
        layout: TokenLayout,
    ) -> torch.Tensor:
        """Refine ``queries`` (N, Lq, C) by attending to ``value_map`` (N, S, C), laid out as ``layout``.

        ``pos`` (N, Lq, C) and ``reference_points`` (N, Lq, L, 2) belong to the queries; with all tokens
        as queries, ``queries`` is ``value_map``.
        """
        attended = self.self_attn(
            queries + pos,
            reference_points,
            value_map,
            layout.spatial_shapes,
            layout.level_start_index,
            layout.padding_mask,
        )
        queries = self.norm1(queries + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(queries), inplace=True)))
        return self.norm2(queries + self.dropout3(ffn))


def encoder_reference_points(layout: TokenLayout) -> torch.Tensor:
    """Each token's cell centre, normalized by its level's valid size, seen from every level.

    Returns:
        (N, S, L, 2) float32 (x, y); tokens in the padding have coordinates above 1.
    """
    valid_ratios = layout.valid_ratios  # (N, L, 2)
    points = []
    for level, (height, width) in enumerate(layout.level_shapes):
        # 0.5, 1.5, ..., H - 0.5: the reference's linspace, exactly (integer steps in float32)
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)  # (H, W) -> (N, H*W)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), -1))
    # (N, S, 2) -> (N, S, L, 2): the same point in every level's valid area
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, S, ...) gathered at index (N, k) along dim 1 -> (N, k, ...)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_kept_rows(token_map: torch.Tensor, selection: TokenSelection, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows`` (N, k, C) into ``token_map`` (N, S, C) at ``selection.indices``, only the rows each
    image keeps; the other selected tokens keep their current features."""
    index = selection.indices[..., None].expand_as(rows)
    rows = torch.where(selection.kept[..., None], rows, token_map.gather(1, index))
    return token_map.scatter(1, index, rows)


@dataclass(frozen=True)
class EncoderAuxHeads:
    """Detection heads on the refined tokens after every encoder layer but the last (they only feed losses).

    Attributes:
        class_heads, box_heads: one per encoder layer but the last.
        proposals: (N, S, 4) each token's logit-space anchor box, which the box heads' output offsets.
    """

    class_heads: Sequence[nn.Module]
    box_heads: Sequence[nn.Module]
    proposals: torch.Tensor


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
        layout: TokenLayout,
        selection: TokenSelection | None = None,
        aux_heads: EncoderAuxHeads | None = None,
    ) -> tuple[torch.Tensor, list[Detections]]:
        """Encode the flattened multi-scale map.

        Args:
            src, pos: (N, S, C) token features and position (+ level) embeddings.
            selection: the tokens to encode, or None for all.
            aux_heads: heads to apply to the encoded tokens after every layer but the last.

        Returns:
            memory (N, S, C), and per aux layer its detections on the encoded tokens (Q = k, or S without
            a selection).
        """
        reference_points = encoder_reference_points(layout)  # (N, S, L, 2)
        proposals = None if aux_heads is None else aux_heads.proposals  # (N, S, 4)
        memory = src
        if selection is not None:
            reference_points = _gather_rows(reference_points, selection.indices)  # (N, k, L, 2)
            pos = _gather_rows(pos, selection.indices)
            queries = _gather_rows(src, selection.indices)
            if proposals is not None:
                proposals = _gather_rows(proposals, selection.indices)
        aux_outputs = []
        for index, layer in enumerate(self.layers):
            if selection is None:
                memory = queries = layer(memory, pos, reference_points, memory, layout)
            else:
                queries = layer(queries, pos, reference_points, memory, layout)
                memory = scatter_kept_rows(memory, selection, queries)
            if aux_heads is not None and index < len(self.layers) - 1:
                aux_outputs.append(
                    {
                        "pred_logits": aux_heads.class_heads[index](queries),
                        "pred_boxes": (aux_heads.box_heads[index](queries) + proposals).sigmoid(),
                    }
                )
        return memory, aux_outputs
