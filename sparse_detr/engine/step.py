"""One optimizer step of SPEC §6, with nothing else around it: forward, the weighted Hungarian loss, backward,
gradient clipping and the AdamW update, over the ``grad_accum`` batches of the step.

It takes what it uses, as DETR's ``train_one_epoch`` does, so the training loop and the step benchmark
(:mod:`sparse_detr.analysis.train_step`) run the same code. Non-finite predictions, losses, gradients or
weights raise :class:`Diverged` before the step changes anything the run would save.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_

from sparse_detr.engine import distributed
from sparse_detr.models import SetCriterion
from sparse_detr.models.criterion import average_num_boxes
from sparse_detr.utils.precision import autocast

Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]  # images (B, 3, H, W), mask (B, H, W), targets


class Diverged(Exception):
    """``what`` became NaN or infinite during a step; ``batch``: the index, within the step, of the batch whose
    forward pass met it (None: the gradients or the updated weights)."""

    def __init__(self, what: str, batch: int | None = None):
        super().__init__(what)
        self.what, self.batch = what, batch
        self.where = ""  # where in the run, for the message: the training loop fills it in


@dataclass(frozen=True)
class StepResult:
    """What one step reports: its losses (summed over its batches, as one large batch's; log-only metrics
    averaged) with ``loss`` the weighted sum, and the gradient norm before clipping."""

    losses: dict[str, float]
    grad_norm: float


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    max_norm: float = 0.1,
    amp: str | None = None,
) -> StepResult:
    """One optimizer step over ``batches`` (on ``device``): each batch's share of the step's loss is
    backpropagated, then the gradients are unscaled (``scaler``: fp16's loss scaling, or a disabled one),
    clipped to ``max_norm`` (0: no clipping) and applied.

    ``model`` is the module whose forward trains: under DDP its wrapper, whose gradients are averaged across
    processes on the step's last batch only.

    Raises:
        Diverged: predictions, losses, gradients or weights became non-finite (in any process).
    """
    # every batch is normalized by the box count of the whole step, so the batches add up to one batch
    num_boxes = average_num_boxes([target for _, _, targets in batches for target in targets], device)
    losses: dict[str, float] = defaultdict(float)
    for index, (images, mask, targets) in enumerate(batches):
        last = index == len(batches) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                outputs = _to_float32(model(images, mask))
            loss, batch_losses, problem = _weighted_loss(criterion, outputs, targets, num_boxes, 1 / len(batches))
            if distributed.any_process(problem is not None, device):
                raise Diverged(problem or "another process's batch", index)
            scaler.scale(loss).backward()  # fp16: scaled, unscaled before clipping
        for key, value in {"loss": loss, **batch_losses}.items():
            additive = key == "loss" or key in criterion.weight_dict
            losses[key] += float(value.detach()) / (1 if additive else len(batches))
    return StepResult(dict(losses), _optimizer_step(_unwrapped(model), optimizer, scaler, device, max_norm))


def _weighted_loss(criterion, outputs, targets, num_boxes: float, batch_share: float):
    """One batch's weighted loss, its unweighted losses and metrics, and what is not finite in them (None:
    nothing; predictions that are not finite are not matched at all)."""
    if not all(bool(torch.isfinite(outputs[key]).all()) for key in ("pred_logits", "pred_boxes")):
        return None, {}, "the model's predictions"
    losses = criterion(outputs, targets, num_boxes, batch_share=batch_share)
    loss = sum(criterion.weight_dict[key] * losses[key] for key in criterion.weight_dict)
    if bool(torch.isfinite(loss)):
        return loss, losses, None
    bad = sorted(key for key, value in losses.items() if not bool(torch.isfinite(value).all()))
    return loss, losses, f"the loss ({', '.join(bad) or 'the weighted sum'})"


def _optimizer_step(model, optimizer, scaler, device, max_norm: float) -> float:
    """Unscale, clip, step; returns the gradient norm. Non-finite gradients (fp16's scaler skips those steps
    itself) and weights the step made non-finite raise :class:`Diverged`."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if distributed.any_process(not scaler.is_enabled() and not bool(torch.isfinite(grad_norm)), device):
        raise Diverged("the gradients")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if distributed.any_process(not finite_parameters(model), device):
        raise Diverged("the weights after the optimizer step")
    return float(grad_norm)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` (images, mask, targets) on ``device``."""
    images, mask, targets = batch
    targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _to_float32(outputs):
    """Half-precision tensors of the model outputs in float32 (the losses and matching run in float32)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs
