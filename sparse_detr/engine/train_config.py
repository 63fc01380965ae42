"""Settings of a training run (SPEC §6 defaults); :class:`~sparse_detr.config.Config` describes the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sparse_detr.errors import ConfigError

AMP_MODES = (None, "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimizer, schedule, batching, precision, checkpointing and output of one run.

    Learning rates are given for a total batch of 16 images; with ``scale_lr`` the run multiplies ``lr``
    and ``lr_backbone`` by sqrt(total / 16), total = ``batch_size`` x processes x ``grad_accum``.
    Parameters whose name contains one of ``linear_proj_names`` train at ``lr x lr_linear_proj_mult``,
    those containing one of ``backbone_names`` at ``lr_backbone``.

    The learning rates drop x0.1 once, after epoch ``lr_drop`` (never when ``lr_drop >= epochs``).
    ``image_size`` is the evaluation shorter side; training sizes follow the COCO recipe scaled by
    ``image_size / 800`` (see :func:`sparse_detr.data.scaled_sizes`). ``checkpoint_every_iters`` counts
    optimizer steps (0: only at the end of each epoch). ``iters_per_epoch`` caps the batches of an epoch
    (None: the whole training set), for quick runs and tests.

    ``init`` starts a new run from the weights of a checkpoint (a file, run folder or zoo name: fine-tuning,
    see :mod:`sparse_detr.engine.finetune`) instead of the backbone's pretrained weights; ``resume``
    continues a run (on the categories it started with, unless ``allow_other_categories``).
    ``tensorboard`` mirrors ``metrics.jsonl`` to TensorBoard event files.
    """

    epochs: int = 50
    lr_drop: int = 40
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    backbone_names: tuple[str, ...] = ("backbone.0",)
    linear_proj_names: tuple[str, ...] = ("sampling_offsets", "reference_points")
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    scale_lr: bool = True
    amp: str | None = None
    grad_accum: int = 1
    seed: int = 42
    workers: int = 2
    image_size: int = 800
    iters_per_epoch: int | None = None
    init: str | None = None
    checkpoint_every_iters: int = 0
    eval_every_epochs: int = 1
    eval_batch_size: int | None = None
    output_dir: str = "runs/default"
    resume: str | None = None
    auto_resume: bool = True
    device: str | None = None
    log_every: int = 20
    tensorboard: bool = False
    allow_other_categories: bool = False
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        self.backbone_names = tuple(self.backbone_names)
        self.linear_proj_names = tuple(self.linear_proj_names)
        self.output_dir = str(self.output_dir)
        if self.resume is not None:
            self.resume = str(self.resume)
        if self.init is not None:
            self.init = str(self.init)
            if self.resume is not None:
                raise ConfigError(
                    "init starts a new run from a checkpoint's weights and resume continues a run: give one"
                )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        positive = ("epochs", "lr_drop", "batch_size", "grad_accum", "image_size", "eval_every_epochs", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("workers", "checkpoint_every_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < self.grad_accum:
            raise ConfigError(
                f"iters_per_epoch ({self.iters_per_epoch}) must be at least grad_accum ({self.grad_accum})"
            )

    @property
    def batch_size_eval(self) -> int:
        return self.eval_batch_size or self.batch_size


def train_config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain dict (JSON-ready; tuples become lists)."""
    data = dataclasses.asdict(config)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`train_config_to_dict`; unknown keys raise KeyError naming the known ones."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KeyError(f"unknown train config field(s) {unknown}; known: {sorted(known)}")
    return TrainConfig(**data)


def train_recipe(preset: str, **overrides: Any) -> TrainConfig:
    """The training recipe of a model preset, with ``overrides`` (TrainConfig fields) applied.

    The paper's presets train with SPEC §6 (the TrainConfig defaults). ``tiny`` has a recipe for a laptop
    CPU: its ResNet-18 learns from scratch (no pretrained weights can be downloaded), so the backbone
    trains at the full learning rate, with a larger clip norm, on 128-pixel images.
    Overriding ``epochs`` but not ``lr_drop`` moves the drop to the same fraction of the run.
    """
    recipe: dict[str, Any] = {
        "output_dir": f"runs/{preset}",
        "epochs": TrainConfig.epochs,
        "lr_drop": TrainConfig.lr_drop,
    }
    if preset == "tiny":
        recipe |= TINY_RECIPE
    if "epochs" in overrides and "lr_drop" not in overrides:
        recipe["lr_drop"] = max(1, round(recipe["lr_drop"] * overrides["epochs"] / recipe["epochs"]))
    recipe |= overrides
    return TrainConfig(**recipe)


TINY_RECIPE: dict[str, Any] = {
    "epochs": 18,
    "lr_drop": 15,
    "batch_size": 4,
    "lr": 1e-3,
    "lr_backbone": 1e-3,
    "clip_max_norm": 1.0,
    "image_size": 128,
    "workers": 1,
}
