"""Setting a run up: the model (from the pretrained backbone, the checkpoint to fine-tune or the one to
resume), its loss, the optimizer state, DDP, the data loaders, the logs and the files of the run folder, all
in one :class:`TrainingSession` that :mod:`~sparse_detr.engine.trainer` trains."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sparse_detr.checkpoint import TrainingCheckpoint, read_checkpoint
from sparse_detr.config import Config, TrainConfig
from sparse_detr.data import CocoDetection, build_transforms, collate, eval_transform, scaled_sizes
from sparse_detr.data.source import DataSource
from sparse_detr.engine import distributed
from sparse_detr.engine.evaluate import build_eval_loader
from sparse_detr.engine.initialization import InitialWeights, init_from_checkpoint
from sparse_detr.engine.interrupts import StopSignals
from sparse_detr.engine.logging import MetricsLog, Progress
from sparse_detr.engine.optim import build_optimizer, build_scheduler
from sparse_detr.engine.run_checks import check_resumable
from sparse_detr.engine.run_config import CONFIG_FILE_NAME, RunConfig
from sparse_detr.engine.sampling import EpochBatchSampler, SeededSamples
from sparse_detr.engine.state import TrainingState, set_rng_state
from sparse_detr.models import SetCriterion, build_criterion, build_model
from sparse_detr.utils.io import atomic_write_text, remove_temporaries

INITIAL_WEIGHTS_FILE = "initial_weights.json"


def build_datasets(train_images, train_ann, val_images, val_ann, image_size: int = 800):
    """Training (augmented, SPEC §6) and evaluation ``CocoDetection`` sets at ``image_size``
    (the evaluation shorter side; training sizes are the COCO recipe scaled by ``image_size / 800``)."""
    train_set = CocoDetection(train_images, train_ann, build_transforms(True, **scaled_sizes(image_size)._asdict()),
                              train=True)  # fmt: skip
    val_set = CocoDetection(val_images, val_ann, eval_transform(image_size))
    return train_set, val_set


@dataclass
class TrainingSession:
    """What one run trains with, built by :func:`set_up`: the model and its loss, the optimizer state, the data,
    the reports, and the last checkpoint known to be good."""

    config: TrainConfig
    model: nn.Module
    criterion: SetCriterion
    state: TrainingState
    batches: EpochBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_set: Any
    label_to_category_id: dict[int, int]  # the training set's: the labels the model predicts
    info: distributed.DistInfo
    progress: Progress
    log: MetricsLog
    categories: dict[int, dict[str, Any]]  # label -> {"id", "name"}: the classes the model predicts
    initial_weights: dict[str, Any] | None  # where the run's weights started (initial_weights.json)
    ddp: DistributedDataParallel | None = None
    signals: StopSignals = field(default_factory=StopSignals)
    good_checkpoint: Path | None = None  # the last checkpoint known to be good (the one to resume from)
    good_step: int = 0  # and its step
    last_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # images and mask, to try a checkpoint's model on

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def train_model(self) -> nn.Module:
        """The module whose forward trains: DDP's wrapper when distributed."""
        return self.ddp if self.ddp is not None else self.model


def set_up(
    model_config: Config,
    config: TrainConfig,
    train_set,
    val_set,
    info: distributed.DistInfo,
    progress: Progress,
    resume_path: Path | None,
    initial_weights: InitialWeights | None,
) -> TrainingSession:
    """Build the model (from the pretrained backbone, the checkpoint to fine-tune or the one to resume),
    criterion, optimizer state, data loaders and reports of a run; write its configuration."""
    if info.is_main:
        _warn_boxes_beyond_queries(train_set, model_config.model.num_queries)
    checkpoint = read_checkpoint(resume_path) if resume_path else None
    stored = TrainingCheckpoint.from_content(checkpoint, resume_path) if checkpoint is not None else None
    if checkpoint is not None:
        check_resumable(checkpoint, model_config, train_set.category_names, resume_path, config.allow_other_categories)
    torch.manual_seed(config.seed + info.rank)
    model = build_model(model_config, initial_weights.backbone if checkpoint is None else None).to(info.device)
    if checkpoint is None and initial_weights.checkpoint is not None:
        init = initial_weights.checkpoint
        report = init_from_checkpoint(model, init.file, train_set.category_names, init.with_backbone)
        for line in report.lines(f"{init.source} ({init.file}, sha256 {init.sha256[:12]})"):
            progress.message(line)
    optimizer = build_optimizer(model, config, info.world_size)
    scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp == "fp16")
    state = TrainingState(optimizer, build_scheduler(optimizer, config), scaler)
    # label -> (category id, name): lets predict/visualize name the classes of a checkpoint
    categories = {
        label: {"id": int(category_id), "name": train_set.category_names[label]}
        for label, category_id in train_set.label_to_category_id.items()
    }
    started_from = stored.initial_weights if stored is not None else initial_weights.to_dict()
    if stored is not None:
        model.load_state_dict(checkpoint["model"])
        _restore(state, stored, resume_path, config, info, progress)
    ddp = None
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=config.find_unused_parameters
        )

    batches = EpochBatchSampler(
        train_set, config.batch_size, config.seed, info.rank, info.world_size, config.iters_per_epoch, config.grad_accum
    )
    train_loader = DataLoader(
        SeededSamples(train_set),
        batch_sampler=batches,
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        persistent_workers=config.workers > 0,
        # the loader's own seed draw must not consume the global generator (dropout's)
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = build_eval_loader(val_set, config.batch_size_eval, config.workers)
    output_dir = Path(config.output_dir)
    if info.is_main:
        for leftover in remove_temporaries(output_dir):  # from writes a killed run left halfway
            progress.message(f"removed {leftover}, a file a killed write left")
    log = MetricsLog(output_dir, info.is_main, config.tensorboard, state.position.step)
    if info.is_main:
        run_config = RunConfig(model_config, config, _data_source(train_set, val_set))
        atomic_write_text(output_dir / CONFIG_FILE_NAME, run_config.to_toml())
        atomic_write_text(output_dir / INITIAL_WEIGHTS_FILE, json.dumps(started_from, indent=2))
    return TrainingSession(
        config, model, build_criterion(model_config).to(info.device), state, batches, train_loader, val_loader,
        val_set, train_set.label_to_category_id, info, progress, log, categories, started_from, ddp,
    )  # fmt: skip


def _restore(state: TrainingState, stored: TrainingCheckpoint, path: Path, config, info, progress) -> None:
    """Continue where the checkpoint ``path`` stopped: optimizer state, position and generators."""
    changed = state.restore(stored) + _move_lr_drop(state, config.lr_drop)
    if changed:
        progress.message(f"learning rates changed on resume: {', '.join(changed)}")
    states = stored.rng
    if len(states) == info.world_size:
        set_rng_state(states[info.rank], info.device)
    else:  # another number of processes: a fresh but reproducible draw
        torch.manual_seed(config.seed + info.rank + state.position.step)
    position = state.position
    progress.message(
        f"resumed from {path}: epoch {position.epoch + 1}, batch {position.iteration}, step {position.step}"
    )


def _move_lr_drop(state: TrainingState, lr_drop: int) -> list[str]:
    """A resumed run with another ``lr_drop`` drops after that epoch: the restored schedule's milestone moves
    and the rates follow (lowered if the run is past the new drop and not the old one, raised back in the
    opposite case); returns the change, as ``"lr_drop old -> new"``."""
    scheduler = state.scheduler
    (old,) = scheduler.milestones
    if old == lr_drop:
        return []
    epochs_done = scheduler.last_epoch
    factor = (scheduler.gamma if epochs_done >= lr_drop else 1.0) / (scheduler.gamma if epochs_done >= old else 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] *= factor
    scheduler.milestones = Counter([lr_drop])
    return [f"lr_drop {old} -> {lr_drop}"]


def _warn_boxes_beyond_queries(train_set, num_queries: int) -> None:
    """Warn (once, with the count) when training images hold more boxes than the model has queries: the
    matcher pairs each query with one box, so the boxes beyond ``num_queries`` in an image are never learned.
    Counted from the annotations of CocoDetection-like sets (``coco`` and ``ids``), before training."""
    coco, ids = getattr(train_set, "coco", None), getattr(train_set, "ids", None)
    if coco is None or ids is None:
        return
    counts = [sum(not ann.get("iscrowd", 0) for ann in coco.imgToAnns.get(image_id, [])) for image_id in ids]
    over = [count for count in counts if count > num_queries]
    if over:
        warnings.warn(
            f"{len(over)} of {len(counts)} training images have more boxes than the model's {num_queries} queries "
            f"(up to {max(over)}): only {num_queries} boxes of an image can be matched and the rest are never "
            "learned; raise model.num_queries (--set model.num_queries=N)",
            stacklevel=4,
        )


def _data_source(train_set, val_set) -> DataSource:
    """Where CocoDetection-like sets read from (an empty source for other datasets)."""
    try:
        return DataSource(
            train_images=str(train_set.images_dir),
            train_ann=str(train_set.annotations_file),
            val_images=str(val_set.images_dir),
            val_ann=str(val_set.annotations_file),
        )
    except AttributeError:
        return DataSource()
