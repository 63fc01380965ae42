"""The detector's outputs: every key, with its shape, in one place.

Shapes: N images, Q queries, C classes, S tokens (all levels), k selected tokens, D decoder layers, M heads,
L levels, P sampling points. Boxes are normalized (cx, cy, w, h) in [0, 1].
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

from sparse_detr.models.token_layout import TokenLayout, TokenSelection


class Detections(TypedDict):
    """One set of detections; Q is the number of queries, or of tokens for the encoder's sets.

    Keys:
        pred_logits: (N, Q, C) class logits (sigmoid, focal loss).
        pred_boxes: (N, Q, 4) boxes.
    """

    pred_logits: Tensor
    pred_boxes: Tensor


class DecoderOutputs(TypedDict):
    """What :class:`~sparse_detr.models.decoder.Decoder` returns, stacked over its D layers.

    Keys:
        layer_logits: (N, D, Q, C) each layer's class logits.
        layer_boxes: (N, D, Q, 4) each layer's boxes.
        sampling_locations: (N, D, Q, M, L, P, 2) normalized (x, y) of the cross-attention samples.
        attention_weights: (N, D, Q, M, L, P) their weights (softmax over each head's L * P samples).
    """

    layer_logits: Tensor
    layer_boxes: Tensor
    sampling_locations: Tensor
    attention_weights: Tensor


class EncoderOutputs(TypedDict, total=False):
    """What the transformer returns about the encoder's tokens besides the decoder's outputs.

    Keys:
        layout: :class:`TokenLayout` of the token map (always).
        token_scores: (N, S) saliency logits of every token, padded ones at the batch minimum (sparse
            models); the scoring network's prediction that ``loss_mask_prediction`` trains.
        selection: :class:`TokenSelection` the encoder refined (sparse models).
        enc_outputs: :class:`Detections` with Q = S, the two-stage proposal head on every token (two-stage
            models).
        enc_aux_outputs: one :class:`Detections` with Q = k per encoder layer but the last, the encoder aux
            heads on the refined tokens (``use_enc_aux_loss``, training or ``return_aux`` only).
        backbone_outputs: :class:`Detections` with Q = S, the OAM scorer's detection head (OAM ranking,
            training or ``return_aux`` only).
    """

    layout: TokenLayout
    token_scores: Tensor
    selection: TokenSelection
    enc_outputs: Detections
    enc_aux_outputs: list[Detections]
    backbone_outputs: Detections


class DetectorOutputs(EncoderOutputs, total=False):
    """What :class:`~sparse_detr.models.detector.DeformableDETR` returns: the keys of :class:`EncoderOutputs`
    and the predictions.

    Keys:
        pred_logits: (N, Q, C) the last decoder layer's class logits (always).
        pred_boxes: (N, Q, 4) its boxes (always).
        aux_outputs: one :class:`Detections` per decoder layer but the last (``aux_loss``).
        sampling_locations: (N, D, Q, M, L, P, 2), see :class:`DecoderOutputs` (always).
        attention_weights: (N, D, Q, M, L, P), see :class:`DecoderOutputs` (always).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[Detections]
    sampling_locations: Tensor
    attention_weights: Tensor
