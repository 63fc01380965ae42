"""Prediction heads: a linear class head and a 3-layer MLP box head (SPEC §5), and which output each serves."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from sparse_detr.config import ModelConfig

# focal-loss prior: every class starts at probability 0.01
CLASS_BIAS_PRIOR = 0.01


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last); parameters ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def class_head(hidden_dim: int, num_classes: int) -> nn.Linear:
    """Linear class head with the focal prior bias."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - CLASS_BIAS_PRIOR) / CLASS_BIAS_PRIOR))
    return head


def box_head(hidden_dim: int) -> MLP:
    """Box head predicting a (cx, cy, w, h) offset in logit space; starts at zero offset."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


@dataclass(frozen=True)
class HeadSlots:
    """Which prediction head serves which output. The detector's ``class_embed.{i}`` / ``bbox_embed.{i}``
    (the released checkpoints' names) are ordered: decoder layers, two-stage proposal head, encoder aux layers.

    Attributes:
        decoder_heads: slice of the heads for the decoder layers, one per layer.
        proposal_head: index of the two-stage proposal head (on every encoder token), or None.
        encoder_aux_heads: slice of the encoder aux heads, one per encoder layer but the last (empty
            without ``use_enc_aux_loss``).
        shared: one head pair serves every slot and is registered once (the plain preset).
    """

    decoder_heads: slice
    proposal_head: int | None
    encoder_aux_heads: slice
    shared: bool

    @classmethod
    def of(cls, config: ModelConfig) -> HeadSlots:
        """The slots of a detector built from ``config``."""
        proposal_head = config.dec_layers if config.two_stage else None
        first_aux = config.dec_layers + int(config.two_stage)
        num_aux = (config.enc_layers - 1) * int(config.use_enc_aux_loss)
        return cls(
            decoder_heads=slice(0, config.dec_layers),
            proposal_head=proposal_head,
            encoder_aux_heads=slice(first_aux, first_aux + num_aux),
            # as in the reference: one shared pair unless boxes are refined or the encoder has aux heads
            shared=not (config.with_box_refine or config.use_enc_aux_loss),
        )

    @property
    def num_slots(self) -> int:
        """Outputs that take a head."""
        return self.encoder_aux_heads.stop

    @property
    def num_registered(self) -> int:
        """Head pairs the detector registers: one when shared, else one per slot."""
        return 1 if self.shared else self.num_slots

    def role(self, index: int) -> str:
        """``"decoder"``, ``"proposal"`` or ``"encoder_aux"``: what registered head ``index`` predicts (the
        shared pair counts as the decoder's)."""
        if self.shared or index < self.decoder_heads.stop:
            return "decoder"
        return "proposal" if index == self.proposal_head else "encoder_aux"


def build_heads(hidden_dim: int, num_classes: int, slots: HeadSlots) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Class and box heads, ``slots.num_registered`` identical copies that train independently.

    Without two-stage proposals the first box head starts with small boxes (w = h = sigmoid(-2)), since its
    references are points, not boxes.
    """
    classes, boxes = class_head(hidden_dim, num_classes), box_head(hidden_dim)
    class_heads = nn.ModuleList(copy.deepcopy(classes) for _ in range(slots.num_registered))
    box_heads = nn.ModuleList(copy.deepcopy(boxes) for _ in range(slots.num_registered))
    if slots.proposal_head is None:
        nn.init.constant_(box_heads[0].layers[-1].bias[2:], -2.0)
    return class_heads, box_heads
