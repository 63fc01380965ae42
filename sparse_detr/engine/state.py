"""A training run's state besides the model: where it stands, the optimizer, the learning-rate schedule and
the fp16 loss scaler, turned into the checkpoint's :class:`~sparse_detr.checkpoint.TrainingCheckpoint` and
restored from it in one place (the file format itself is :mod:`sparse_detr.checkpoint`'s)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_detr.checkpoint import CHECKPOINT_NAME, TrainingCheckpoint, checkpoint_file


@dataclass
class Position:
    """Where a run stands: the next batch is batch ``iteration`` of epoch ``epoch`` (both from 0), after
    ``step`` optimizer steps."""

    epoch: int = 0
    iteration: int = 0
    step: int = 0

    def batches_done(self, epoch: int) -> int:
        """The batches of ``epoch`` trained already: this position's in its own epoch (a resumed one), none
        in a later one."""
        return self.iteration if epoch == self.epoch else 0


@dataclass
class TrainingState:
    """The optimizer, its learning-rate schedule, the fp16 loss scaler and the run's position."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    position: Position = field(default_factory=Position)

    def to_checkpoint(self, **entries: Any) -> TrainingCheckpoint:
        """This state as a checkpoint's training entries, with the other ``entries`` (``rng``, ``sampler``,
        ``initial_weights``)."""
        return TrainingCheckpoint(
            self.optimizer.state_dict(), self.scheduler.state_dict(), self.scaler.state_dict(),
            self.position.epoch, self.position.iteration, self.position.step, **entries,
        )  # fmt: skip

    def restore(self, stored: TrainingCheckpoint) -> list[str]:
        """Continue from a checkpoint's training entries. Learning rates configured differently from the
        stored run's (say, lower ones after a divergence) replace them, at the point of the schedule the run had
        reached; returns those changes, one ``"group old -> new"`` each."""
        configured = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(stored.optimizer)
        self.scheduler.load_state_dict(stored.lr_scheduler)
        self.scaler.load_state_dict(stored.scaler)
        self.position = Position(stored.epoch, stored.iteration, stored.step)
        changed = []
        for group, rate in zip(self.optimizer.param_groups, configured):
            if not math.isclose(group["initial_lr"], rate):
                changed.append(f"{group['name']} {group['initial_lr']:.3g} -> {rate:.3g}")
                group["lr"] *= rate / group["initial_lr"]
                group["initial_lr"] = rate
        if changed:
            self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        return changed

    def end_epoch(self) -> None:
        """Step the per-epoch schedule and move to the start of the next epoch."""
        self.scheduler.step()
        self.position = Position(self.position.epoch + 1, 0, self.position.step)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states (torch, CUDA of ``device``, numpy, Python)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def find_resume_path(output_dir: str | Path, resume: str | None, auto_resume: bool) -> Path | None:
    """``resume`` if given (a checkpoint file, or a run folder whose last checkpoint it takes), else the output folder's
    checkpoint when ``auto_resume`` and there is one."""
    if resume is not None:
        return checkpoint_file(resume, f"--resume {resume}", last=True)
    latest = Path(output_dir) / CHECKPOINT_NAME
    return latest if auto_resume and latest.is_file() else None
