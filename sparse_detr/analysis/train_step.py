"""Seconds per training iteration: the engine's own :func:`~sparse_detr.engine.step.train_step` (forward,
weighted SPEC §6 loss, backward, clipping and the AdamW update of the preset's recipe) on synthetic images with a
few random boxes each (no data loading)."""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from sparse_detr.config import Config, get_preset, train_recipe
from sparse_detr.engine.optim import build_optimizer
from sparse_detr.engine.step import train_step
from sparse_detr.models import build_criterion, build_model
from sparse_detr.utils.io import check_writable
from sparse_detr.utils.report import write_table
from sparse_detr.utils.timer import Timer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStepResult:
    preset: str
    backbone: str
    rho: float  # the keep ratio, under its report column's name (README glossary)
    height: int
    width: int
    batch_size: int
    s_per_iter: float  # median
    s_per_iter_min: float
    s_per_iter_max: float
    iters: int
    device: str


def random_targets(batch_size: int, objects: int, num_classes: int, generator: torch.Generator) -> list[dict]:
    """``objects`` boxes per image: labels in [0, num_classes), normalized cxcywh boxes inside the image."""
    targets = []
    for _ in range(batch_size):
        size = 0.05 + 0.3 * torch.rand(objects, 2, generator=generator)
        center = size / 2 + (1 - size) * torch.rand(objects, 2, generator=generator)
        labels = torch.randint(num_classes, (objects,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([center, size], dim=1)})
    return targets


def measure_train_step(
    config: Config,
    height: int,
    width: int,
    batch_size: int = 1,
    iters: int = 3,
    warmup: int = 1,
    objects: int = 7,
    device: str | torch.device = "cpu",
) -> TrainStepResult:
    """Median wall time of ``iters`` training iterations after ``warmup`` ones, with the optimizer groups
    and clipping of the preset's training recipe."""
    device = torch.device(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(config).to(device).train()
    criterion = build_criterion(config).to(device)
    recipe = train_recipe(config.name)
    optimizer = build_optimizer(model, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp == "fp16")
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)  # no padding
    targets = [
        {k: v.to(device) for k, v in t.items()}
        for t in random_targets(batch_size, objects, config.model.num_classes, generator)
    ]

    def step() -> None:
        train_step(model, criterion, [(images, mask, targets)], optimizer, scaler, device, recipe.clip_max_norm,
                   recipe.amp)  # fmt: skip

    times = []
    for index in range(warmup + iters):
        with Timer(device) as timer:
            step()
        if index >= warmup:
            times.append(timer.seconds)
    return TrainStepResult(
        preset=config.name,
        backbone=config.model.backbone,
        rho=config.model.keep_ratio,
        height=height,
        width=width,
        batch_size=batch_size,
        s_per_iter=statistics.median(times),
        s_per_iter_min=min(times),
        s_per_iter_max=max(times),
        iters=iters,
        device=str(device),
    )


def train_step_table(
    presets: list[str],
    height: int,
    width: int,
    batch_sizes: tuple[int, ...] = (1,),
    backbone: str | None = None,
    iters: int = 3,
    warmup: int = 1,
    device: str = "cpu",
) -> pd.DataFrame:
    """One row per (preset, batch size): seconds per training iteration, images per second and the speed-up
    over the first preset at the same batch size."""
    rows = []
    for name in presets:
        for batch_size in batch_sizes:
            logger.info(f"measuring {name}, batch {batch_size}")
            result = measure_train_step(
                get_preset(name, backbone), height, width, batch_size, iters, warmup, device=device
            )
            rows.append(asdict(result))
    frame = pd.DataFrame(rows)
    frame["images_per_s"] = frame["batch_size"] / frame["s_per_iter"]
    first = frame.groupby("batch_size")["s_per_iter"].transform("first")
    frame["speedup_vs_first"] = first / frame["s_per_iter"]
    frame["threads"] = torch.get_num_threads()
    return frame


TRAIN_STEP_COLUMNS = ("preset", "backbone", "rho", "batch_size", "s_per_iter", "images_per_s", "speedup_vs_first")


def write_train_step_report(
    presets: list[str],
    height: int,
    width: int,
    batch_sizes: tuple[int, ...],
    backbone: str | None,
    iters: int,
    warmup: int,
    device: str,
    threads: int | None,
    folder: str | Path,
) -> tuple[pd.DataFrame, tuple[Path, Path]]:
    """``sdetr benchmark-train``: :func:`train_step_table` (on ``threads`` CPU threads when given) written to
    ``folder/train_step.csv`` and ``.md``; returns the table and the two paths."""
    check_writable(folder)
    if threads:
        torch.set_num_threads(threads)
    frame = train_step_table(presets, height, width, batch_sizes, backbone, iters, warmup, device)
    notes = [
        f"One random {height}×{width} image per batch entry with 7 random boxes; median of {iters} iterations "
        f"after {warmup} warm-up; each iteration is the forward pass, the weighted loss, the backward pass, "
        "gradient clipping and the AdamW step of the preset's training recipe (no data loading).",
    ]
    return frame, write_table(frame, folder, "train_step", f"Training step: {height}x{width}", notes)
