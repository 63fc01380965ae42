"""Deformable transformer: token flattening, sparse encoder, query selection, decoder (SPEC §2, §4, §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparse_detr.config import ModelConfig
from sparse_detr.errors import ConfigError, InputError
from sparse_detr.models.decoder import Decoder, DecoderLayer
from sparse_detr.models.deformable_attention import MSDeformAttn
from sparse_detr.models.encoder import EncoderLayer, SparseEncoder
from sparse_detr.models.heads import box_head, class_head
from sparse_detr.models.position_encoding import box_position_encoding
from sparse_detr.models.scoring import ScoringNetwork, fill_padded_scores, keep_counts, select_tokens


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) padding mask -> (N, 2) float32 (valid width / W, valid height / H)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


def token_proposals(
    mask_flatten: torch.Tensor, spatial_shapes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per token: its cell centre over the level's valid size, w = h = 0.05 * 2^level.

    Args:
        mask_flatten: (N, S) True on padding. spatial_shapes: (L, 2).

    Returns:
        proposals (N, S, 4) float32 in logit space, +inf for padded tokens and boxes not inside
        (0.01, 0.99); valid (N, S) bool, False for boxes not inside (0.01, 0.99).
    """
    n = mask_flatten.shape[0]
    boxes, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        level_mask = mask_flatten[:, start : start + height * width].view(n, height, width)
        valid_h = (~level_mask[:, :, 0]).sum(1)
        valid_w = (~level_mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(
            torch.linspace(0, height - 1, height, dtype=torch.float32, device=mask_flatten.device),
            torch.linspace(0, width - 1, width, dtype=torch.float32, device=mask_flatten.device),
            indexing="ij",
        )
        valid_size = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        centres = (torch.stack([xs, ys], -1)[None] + 0.5) / valid_size  # (N, H, W, 2)
        sizes = torch.full_like(centres, 0.05 * 2.0**level)
        boxes.append(torch.cat([centres, sizes], -1).view(n, -1, 4))
        start += height * width
    boxes = torch.cat(boxes, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
    proposals = torch.log(boxes / (1 - boxes))
    proposals = proposals.masked_fill(mask_flatten[..., None] | ~valid[..., None], float("inf"))
    return proposals, valid


class DeformableTransformer(nn.Module):
    """Encoder-decoder over the multi-scale token map.

    The prediction heads are owned by the detector and passed to :meth:`forward`; head order is
    [decoder layers, two-stage encoder output, encoder aux layers].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_model = config.hidden_dim
        self.d_model = d_model
        self.two_stage = config.two_stage
        self.refine_boxes = config.with_box_refine
        self.num_queries = config.num_queries
        self.token_ranking = config.token_ranking
        self.keep_ratio = config.keep_ratio
        self.use_enc_aux_loss = config.use_enc_aux_loss
        levels, heads = config.num_feature_levels, config.nheads
        ffn, dropout = config.dim_feedforward, config.dropout

        sparse = config.is_sparse
        if sparse and config.token_ranking == "dam":
            self.enc_mask_predictor = ScoringNetwork(d_model)
        self.encoder = SparseEncoder(
            lambda: EncoderLayer(d_model, ffn, dropout, levels, heads, config.enc_n_points), config.enc_layers
        )
        self.decoder = Decoder(
            lambda: DecoderLayer(d_model, ffn, dropout, levels, heads, config.dec_n_points), config.dec_layers
        )
        self.level_embed = nn.Parameter(torch.empty(levels, d_model))
        if config.two_stage or sparse:
            # shared by the scoring input and the two-stage head
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        if config.two_stage:
            self.pos_trans = nn.Linear(2 * d_model, d_model)
            self.pos_trans_norm = nn.LayerNorm(d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()
        if sparse and config.token_ranking == "oam":
            self.oam_class_embed = class_head(d_model, config.num_classes)
            self.oam_bbox_embed = box_head(d_model)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if hasattr(self, "reference_points"):
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def _project(self, tokens: torch.Tensor, mask_flatten: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``enc_output`` + ``enc_output_norm`` of tokens zeroed on padding and invalid proposals."""
        tokens = tokens.masked_fill((mask_flatten | ~valid)[..., None], 0.0)
        return self.enc_output_norm(self.enc_output(tokens))

    @property
    def can_sparsify(self) -> bool:
        """Whether this transformer has what its saliency criterion needs to rank tokens."""
        if self.token_ranking == "dam":
            return hasattr(self, "enc_mask_predictor")
        if self.token_ranking == "oam":
            return hasattr(self, "oam_class_embed")
        return True

    def _score_tokens(
        self,
        tokens: torch.Tensor,
        mask_flatten: torch.Tensor,
        proposals: torch.Tensor,
        proposals_valid: torch.Tensor,
        with_aux: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Saliency (N, S) of ``tokens`` = src + pos (N, S, C) by the configured criterion, padded
        tokens filled with the batch minimum; plus the OAM head's detections when ``with_aux``."""
        if self.token_ranking == "random":
            scores = torch.rand(mask_flatten.shape, dtype=tokens.dtype, device=tokens.device)
            return fill_padded_scores(scores, mask_flatten), None
        scoring_input = self._project(tokens, mask_flatten, proposals_valid)
        head_outputs = None
        if self.token_ranking == "dam":
            scores = self.enc_mask_predictor(scoring_input)
        else:
            logits = self.oam_class_embed(scoring_input)  # (N, S, C')
            scores = logits.max(-1).values
            if with_aux:
                boxes = (self.oam_bbox_embed(scoring_input) + proposals).sigmoid()
                head_outputs = {"pred_logits": logits, "pred_boxes": boxes}
        return fill_padded_scores(scores, mask_flatten), head_outputs

    def _two_stage_queries(
        self,
        memory: torch.Tensor,
        mask_flatten: torch.Tensor,
        proposals: torch.Tensor,
        valid: torch.Tensor,
        class_head_: nn.Module,
        box_head_: nn.Module,
    ):
        """Rank every token as a detection and turn the top ``num_queries`` into decoder queries."""
        if memory.shape[1] < self.num_queries:
            raise InputError(
                f"the image gives {memory.shape[1]} tokens, fewer than the {self.num_queries} queries "
                "that two-stage selection takes: use a larger input image"
            )
        projected = self._project(memory, mask_flatten, valid)
        enc_logits = class_head_(projected)  # (N, S, C')
        enc_box_logits = box_head_(projected) + proposals  # (N, S, 4)
        top = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # (N, Q)
        top_box_logits = enc_box_logits.gather(1, top[..., None].expand(-1, -1, 4)).detach()
        query_pos = self.pos_trans_norm(
            self.pos_trans(box_position_encoding(top_box_logits, self.d_model // 2))
        )
        tgt = memory.gather(1, top[..., None].expand(-1, -1, memory.shape[-1]))
        enc_outputs = {"pred_logits": enc_logits, "pred_boxes": enc_box_logits.sigmoid()}
        return tgt, query_pos, top_box_logits.sigmoid(), enc_outputs

    def forward(
        self,
        srcs: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        class_heads: Sequence[nn.Module],
        box_heads: Sequence[nn.Module],
        query_embed: torch.Tensor | None = None,
        keep_ratio: float | None = None,
        with_aux: bool = False,
    ) -> dict:
        """Run encoder and decoder.

        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l). masks: per level (N, H_l, W_l) True on padding.
            class_heads, box_heads: the detector's heads (see class docstring).
            query_embed: (Q, 2C) learned queries (position | content) when not two-stage.
            keep_ratio: overrides ``self.keep_ratio``; 0 encodes every token without scoring.
            with_aux: also compute outputs that only feed losses (encoder aux heads, OAM head).

        Returns:
            dict with the decoder outputs (per layer, see :class:`Decoder`), ``enc_outputs``,
            ``enc_aux_outputs``, ``backbone_outputs``, ``token_scores``, ``selected_tokens``,
            ``keep_counts`` where they apply, and the token layout (``spatial_shapes``,
            ``level_start_index``, ``mask_flatten``, ``valid_ratios``).
        """
        keep_ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        # flatten each level row-major and concatenate: (N, S, C)
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level] for level, p in enumerate(pos_embeds)], 1
        )
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        spatial_shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.int64, device=src.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_ratios = torch.stack([valid_ratios_of(m) for m in masks], 1)  # (N, L, 2)
        proposals, proposals_valid = token_proposals(mask_flatten, spatial_shapes)
        out = {
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "mask_flatten": mask_flatten,
            "valid_ratios": valid_ratios,
        }

        selected = counts = None
        if keep_ratio > 0:
            if not self.can_sparsify:
                raise ConfigError(
                    f"keep_ratio {keep_ratio} needs token scores, but this model was built without a "
                    f"{self.token_ranking!r} scorer (config keep_ratio 0)"
                )
            scores, head_outputs = self._score_tokens(
                src + pos, mask_flatten, proposals, proposals_valid, with_aux
            )
            counts = keep_counts(mask_flatten, keep_ratio)
            selected = select_tokens(scores, counts)
            out.update(token_scores=scores, selected_tokens=selected, keep_counts=counts)
            if head_outputs is not None:
                out["backbone_outputs"] = head_outputs

        num_dec = len(self.decoder.layers)
        aux_heads = None
        if self.use_enc_aux_loss and with_aux:
            first = num_dec + int(self.two_stage)
            aux_heads = (class_heads[first:], box_heads[first:])
        memory, enc_aux_outputs = self.encoder(
            src, pos, spatial_shapes, level_start_index, valid_ratios, mask_flatten,
            selected=selected, counts=counts, aux_heads=aux_heads, proposals=proposals,
        )  # fmt: skip
        if aux_heads is not None:
            out["enc_aux_outputs"] = enc_aux_outputs

        if self.two_stage:
            tgt, query_pos, reference_points, out["enc_outputs"] = self._two_stage_queries(
                memory, mask_flatten, proposals, proposals_valid, class_heads[num_dec], box_heads[num_dec]
            )
        else:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos = query_pos[None].expand(src.shape[0], -1, -1)
            tgt = tgt[None].expand(src.shape[0], -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        decoded = self.decoder(
            tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
            mask_flatten, class_heads[:num_dec], box_heads[:num_dec], refine_boxes=self.refine_boxes,
        )  # fmt: skip
        out.update(decoded)
        return out
