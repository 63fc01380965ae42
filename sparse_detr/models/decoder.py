"""Deformable decoder with iterative box refinement (SPEC §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparse_detr.models.box_ops import inverse_sigmoid
from sparse_detr.models.deformable_attention import MSDeformAttn
from sparse_detr.models.outputs import DecoderOutputs
from sparse_detr.models.token_layout import TokenLayout


class DecoderLayer(nn.Module):
    """Post-norm layer: query self-attention (``norm2``), deformable cross-attention to the encoder
    memory (``norm1``), ReLU FFN (``norm3``); names follow the reference checkpoints."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        layout: TokenLayout,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: tgt, query_pos (N, Q, C); reference_points (N, Q, L, 2 or 4); memory (N, S, C) laid out as
        ``layout``.

        Returns:
            tgt (N, Q, C), sampling locations (N, Q, M, L, P, 2), attention weights (N, Q, M, L, P).
        """
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended, locations, weights = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            layout.spatial_shapes,
            layout.level_start_index,
            layout.padding_mask,
            return_sampling=True,
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn)), locations, weights


class Decoder(nn.Module):
    """Stack of :class:`DecoderLayer` that also applies the per-layer prediction heads."""

    def __init__(self, layer_factory, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_factory() for _ in range(num_layers))

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        layout: TokenLayout,
        class_heads: Sequence[nn.Module],
        box_heads: Sequence[nn.Module],
        refine_boxes: bool,
    ) -> DecoderOutputs:
        """Decode the queries and predict after every layer.

        Args:
            tgt, query_pos: (N, Q, C) query content and position.
            reference_points: (N, Q, 2) points or (N, Q, 4) boxes, normalized to the valid image area.
            memory: (N, S, C) encoder output, laid out as ``layout``.
            class_heads, box_heads: head i predicts from layer i; the box head gives a logit-space offset
                from the layer's input reference (only to its centre for 2-d references).
            refine_boxes: the next layer's reference boxes are this layer's predicted boxes (detached).

        Returns:
            every layer's predictions and cross-attention samples, see :class:`DecoderOutputs`.
        """
        valid_ratios = layout.valid_ratios  # (N, L, 2)
        logits, boxes, locations, weights = [], [], [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scale = torch.cat([valid_ratios, valid_ratios], -1)
            else:
                scale = valid_ratios
            # reference in the padded map's coordinates, one per level: (N, Q, L, 2 or 4)
            reference_input = reference_points[:, :, None] * scale[:, None]
            tgt, layer_locations, layer_weights = layer(tgt, query_pos, reference_input, memory, layout)
            offset = box_heads[index](tgt)
            if reference_points.shape[-1] == 4:
                box = (offset + inverse_sigmoid(reference_points)).sigmoid()
            else:
                box = torch.cat([offset[..., :2] + inverse_sigmoid(reference_points), offset[..., 2:]], -1).sigmoid()
            if refine_boxes:
                reference_points = box.detach()
            logits.append(class_heads[index](tgt))
            boxes.append(box)
            locations.append(layer_locations)
            weights.append(layer_weights)
        return {
            "layer_logits": torch.stack(logits, 1),
            "layer_boxes": torch.stack(boxes, 1),
            "sampling_locations": torch.stack(locations, 1),
            "attention_weights": torch.stack(weights, 1),
        }
