"""AdamW with the three parameter groups of SPEC §6 and the one-step learning-rate drop."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparse_detr.config import TrainConfig


def lr_scale(config: TrainConfig, world_size: int = 1) -> float:
    """sqrt(total batch / 16) with ``scale_lr``, else 1; total = batch x processes x accumulation."""
    if not config.scale_lr:
        return 1.0
    return math.sqrt(config.batch_size * world_size * config.grad_accum / 16)


def param_groups(model: nn.Module, config: TrainConfig, scale: float = 1.0) -> list[dict]:
    """Trainable parameters split into ``default`` (lr), ``backbone`` (lr_backbone) and ``linear_proj``
    (lr x lr_linear_proj_mult: sampling offsets and reference points, wherever they are). Each group has
    a ``name``; ``lr`` and ``lr_backbone`` are multiplied by ``scale``. Empty groups are left out."""
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in config.linear_proj_names):
            groups["linear_proj"].append(param)
        elif any(key in name for key in config.backbone_names):
            groups["backbone"].append(param)
        else:
            groups["default"].append(param)
    lrs = {
        "default": config.lr * scale,
        "backbone": config.lr_backbone * scale,
        "linear_proj": config.lr * scale * config.lr_linear_proj_mult,
    }
    return [{"name": name, "params": params, "lr": lrs[name]} for name, params in groups.items() if params]


def build_optimizer(model: nn.Module, config: TrainConfig, world_size: int = 1) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the scaled learning rates and ``weight_decay``."""
    groups = param_groups(model, config, lr_scale(config, world_size))
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """x0.1 once, after epoch ``lr_drop``; stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[config.lr_drop], gamma=0.1)
