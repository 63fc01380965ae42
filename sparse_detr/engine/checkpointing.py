"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is a :func:`sparse_detr.checkpoint.save_checkpoint` file (so ``load_model``
reads it) with these extra entries: ``optimizer``, ``lr_scheduler``, ``scaler`` state dicts,
``epoch`` / ``iteration`` (the position to resume at: batch ``iteration`` of epoch ``epoch``, both
from 0), ``step`` (optimizer steps so far), ``rng`` (one entry per process: torch, CUDA, numpy and
Python generator states), ``sampler`` (its seed; the data order follows from seed and position) and
``train_config``. Only plain containers and tensors are stored, so it loads with ``weights_only``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_detr.checkpoint import CHECKPOINT_NAME
from sparse_detr.errors import MissingFileError


@dataclass
class Position:
    """Where a run stands: the next batch is batch ``iteration`` of epoch ``epoch`` (both from 0)."""

    epoch: int = 0
    iteration: int = 0
    step: int = 0


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
    """``resume`` if given (it must exist), else the output folder's checkpoint when ``auto_resume``."""
    if resume is not None:
        path = Path(resume)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise MissingFileError(f"--resume {resume}: no checkpoint there")
        return path
    latest = Path(output_dir) / CHECKPOINT_NAME
    return latest if auto_resume and latest.is_file() else None
