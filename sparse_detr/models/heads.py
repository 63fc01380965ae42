"""Prediction heads: a linear class head and a 3-layer MLP box head (SPEC §5)."""

from __future__ import annotations

import copy
import math

import torch.nn.functional as F
from torch import nn

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


def build_heads(
    hidden_dim: int, num_classes: int, num_heads: int, shared: bool, two_stage: bool
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Class and box heads, ordered [decoder layers, two-stage encoder output, encoder aux layers].

    ``shared``: one head pair used for every output (registered once). Otherwise ``num_heads``
    identical copies that train independently. Without two-stage proposals the first box head starts
    with small boxes (w = h = sigmoid(-2)), since its references are points, not boxes.
    """
    classes, boxes = class_head(hidden_dim, num_classes), box_head(hidden_dim)
    count = 1 if shared else num_heads
    class_heads = nn.ModuleList(copy.deepcopy(classes) for _ in range(count))
    box_heads = nn.ModuleList(copy.deepcopy(boxes) for _ in range(count))
    if not two_stage:
        nn.init.constant_(box_heads[0].layers[-1].bias[2:], -2.0)
    return class_heads, box_heads
