"""Deformable transformer: token flattening, sparse encoder, query selection, decoder (SPEC §2, §4, §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparse_detr.config import ModelConfig
from sparse_detr.errors import ConfigError, InputError
from sparse_detr.models.decoder import Decoder, DecoderLayer
from sparse_detr.models.deformable_attention import MSDeformAttn
from sparse_detr.models.encoder import EncoderAuxHeads, EncoderLayer, SparseEncoder
from sparse_detr.models.heads import HeadSlots, box_head, class_head
from sparse_detr.models.outputs import DecoderOutputs, Detections, EncoderOutputs
from sparse_detr.models.position_encoding import box_position_encoding
from sparse_detr.models.scoring import ScoringNetwork, fill_padded_scores, keep_counts, most_kept
from sparse_detr.models.token_layout import TokenLayout, TokenSelection

# the token rankings whose scores come from a ScoringNetwork; they differ only in its training target (criterion)
SCORING_NETWORK_RANKINGS = ("dam", "foreground", "salience")


def token_proposals(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per token: its cell centre over the level's valid size, w = h = 0.05 * 2^level.

    Returns:
        proposals (N, S, 4) float32 in logit space, +inf for padded tokens and boxes not inside
        (0.01, 0.99); valid (N, S) bool, False for boxes not inside (0.01, 0.99).
    """
    padding_mask = layout.padding_mask
    n = padding_mask.shape[0]
    boxes, start = [], 0
    for level, (height, width) in enumerate(layout.level_shapes):
        level_mask = padding_mask[:, start : start + height * width].view(n, height, width)
        valid_h = (~level_mask[:, :, 0]).sum(1)
        valid_w = (~level_mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=padding_mask.device),
            torch.arange(width, dtype=torch.float32, device=padding_mask.device),
            indexing="ij",
        )
        valid_size = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        centres = (torch.stack([xs, ys], -1)[None] + 0.5) / valid_size  # (N, H, W, 2)
        sizes = torch.full_like(centres, 0.05 * 2.0**level)
        boxes.append(torch.cat([centres, sizes], -1).view(n, -1, 4))  # (N, H*W, 4)
        start += height * width
    boxes = torch.cat(boxes, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
    proposals = torch.log(boxes / (1 - boxes))
    proposals = proposals.masked_fill(padding_mask[..., None] | ~valid[..., None], float("inf"))
    return proposals, valid


class DeformableTransformer(nn.Module):
    """Encoder-decoder over the multi-scale token map.

    The prediction heads are owned by the detector and passed to :meth:`forward`, one per slot of
    :class:`~sparse_detr.models.heads.HeadSlots`.
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
        self.head_slots = HeadSlots.of(config)
        levels, heads = config.num_feature_levels, config.nheads
        ffn, dropout = config.dim_feedforward, config.dropout

        sparse = config.is_sparse
        if sparse and config.token_ranking in SCORING_NETWORK_RANKINGS:
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

    def _project(self, tokens: torch.Tensor, padding_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``enc_output`` + ``enc_output_norm`` of tokens (N, S, C) zeroed on padding and invalid proposals."""
        tokens = tokens.masked_fill((padding_mask | ~valid)[..., None], 0.0)
        return self.enc_output_norm(self.enc_output(tokens))

    @property
    def can_sparsify(self) -> bool:
        """Whether this transformer has what its token ranking needs to rank tokens."""
        if self.token_ranking in SCORING_NETWORK_RANKINGS:
            return hasattr(self, "enc_mask_predictor")
        if self.token_ranking == "oam":
            return hasattr(self, "oam_class_embed")
        return True

    def _score_tokens(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor,
        proposals: torch.Tensor,
        proposals_valid: torch.Tensor,
        with_aux: bool,
    ) -> tuple[torch.Tensor, Detections | None]:
        """Saliency (N, S) of ``tokens`` = src + pos (N, S, C) by the configured criterion, padded
        tokens filled with the batch minimum; plus the OAM head's detections when ``with_aux``."""
        if self.token_ranking == "random":
            scores = torch.rand(padding_mask.shape, dtype=tokens.dtype, device=tokens.device)
            return fill_padded_scores(scores, padding_mask), None
        scoring_input = self._project(tokens, padding_mask, proposals_valid)
        head_outputs = None
        if self.token_ranking in SCORING_NETWORK_RANKINGS:
            scores = self.enc_mask_predictor(scoring_input)
        else:
            logits = self.oam_class_embed(scoring_input)  # (N, S, C')
            scores = logits.max(-1).values
            if with_aux:
                boxes = (self.oam_bbox_embed(scoring_input) + proposals).sigmoid()
                head_outputs = {"pred_logits": logits, "pred_boxes": boxes}
        return fill_padded_scores(scores, padding_mask), head_outputs

    def _two_stage_queries(
        self,
        memory: torch.Tensor,
        padding_mask: torch.Tensor,
        proposals: torch.Tensor,
        valid: torch.Tensor,
        class_head_: nn.Module,
        box_head_: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Detections]:
        """Rank every token as a detection and turn the top ``num_queries`` into decoder queries.

        Returns:
            tgt, query_pos (N, Q, C), reference boxes (N, Q, 4), and the detections of every token.
        """
        if memory.shape[1] < self.num_queries:
            raise InputError(
                f"the image gives {memory.shape[1]} tokens, fewer than the {self.num_queries} queries "
                "that two-stage selection takes: use a larger input image"
            )
        projected = self._project(memory, padding_mask, valid)
        enc_logits = class_head_(projected)  # (N, S, C')
        enc_box_logits = box_head_(projected) + proposals  # (N, S, 4)
        top = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # (N, Q)
        top_box_logits = enc_box_logits.gather(1, top[..., None].expand(-1, -1, 4)).detach()
        query_pos = self.pos_trans_norm(self.pos_trans(box_position_encoding(top_box_logits, self.d_model // 2)))
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
    ) -> tuple[EncoderOutputs, DecoderOutputs]:
        """Run encoder and decoder.

        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l). masks: per level (N, H_l, W_l) True on padding.
            class_heads, box_heads: the detector's heads, one per slot of ``self.head_slots``.
            query_embed: (Q, 2C) learned queries (position | content) when not two-stage.
            keep_ratio: overrides ``self.keep_ratio``; 0 encodes every token without scoring.
            with_aux: also compute outputs that only feed losses (encoder aux heads, OAM head).
        """
        keep_ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        layout = TokenLayout.of(masks)
        # flatten each level row-major and concatenate: (N, C, H_l, W_l) -> (N, S, C)
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level] for level, p in enumerate(pos_embeds)], 1
        )
        proposals, proposals_valid = token_proposals(layout)
        encoded: EncoderOutputs = {"layout": layout}

        selection = None
        if keep_ratio > 0:
            if not self.can_sparsify:
                raise ConfigError(
                    f"keep_ratio {keep_ratio} needs token scores, but this model was built without a "
                    f"{self.token_ranking!r} scorer (config keep_ratio 0)"
                )
            scores, head_outputs = self._score_tokens(
                src + pos, layout.padding_mask, proposals, proposals_valid, with_aux
            )
            counts = keep_counts(layout.padding_mask, keep_ratio)
            selection = TokenSelection.top(scores, counts, most=most_kept(layout.num_tokens, keep_ratio))
            encoded.update(token_scores=scores, selection=selection)
            if head_outputs is not None:
                encoded["backbone_outputs"] = head_outputs

        slots = self.head_slots
        aux_heads = None
        if self.use_enc_aux_loss and with_aux:
            aux = slots.encoder_aux_heads
            aux_heads = EncoderAuxHeads(class_heads[aux], box_heads[aux], proposals)
        memory, enc_aux_outputs = self.encoder(src, pos, layout, selection, aux_heads)
        if aux_heads is not None:
            encoded["enc_aux_outputs"] = enc_aux_outputs

        if self.two_stage:
            proposal = slots.proposal_head
            tgt, query_pos, reference_points, encoded["enc_outputs"] = self._two_stage_queries(
                memory, layout.padding_mask, proposals, proposals_valid, class_heads[proposal], box_heads[proposal]
            )
        else:
            query_pos, tgt = query_embed.split(self.d_model, dim=1)
            query_pos = query_pos[None].expand(src.shape[0], -1, -1)
            tgt = tgt[None].expand(src.shape[0], -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        decoded = self.decoder(
            tgt, query_pos, reference_points, memory, layout,
            class_heads[slots.decoder_heads], box_heads[slots.decoder_heads], refine_boxes=self.refine_boxes,
        )  # fmt: skip
        return encoded, decoded
