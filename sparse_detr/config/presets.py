"""The named presets of SPEC §1, a registry as timm's: one function per preset (:func:`register_preset`)
returns its model, loss and training recipe together (:class:`Preset`); :func:`list_presets` names them,
:func:`get_preset` gives a model and loss, :func:`train_recipe` a recipe with overrides. The registry is read
when asked, so a preset registered after import counts everywhere."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparse_detr.config.types import KEEP_RATIOS, Config, ModelConfig, TrainConfig
from sparse_detr.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A named model (with its loss) and the recipe that trains it."""

    config: Config
    train: TrainConfig


_REGISTRY: dict[str, Callable[[], Preset]] = {}


def register_preset(name: str) -> Callable[[Callable[[], Preset]], Callable[[], Preset]]:
    """Register a function that returns a :class:`Preset` under ``name`` (as timm registers its models)."""

    def register(function: Callable[[], Preset]) -> Callable[[], Preset]:
        _REGISTRY[name] = function
        return function

    return register


def _paper_preset(name: str, model: ModelConfig) -> Preset:
    """The paper's presets train with SPEC §6: the TrainConfig defaults."""
    return Preset(Config(name, model), TrainConfig(output_dir=f"runs/{name}"))


@register_preset("deformable")
def deformable() -> Preset:
    """Deformable DETR: learned queries, no box refinement, every encoder token encoded."""
    return _paper_preset("deformable", ModelConfig())


@register_preset("deformable-topk-bbr")
def deformable_topk_bbr() -> Preset:
    """Dense baseline (top-k & BBR): Deformable DETR with two-stage top-k queries and box refinement."""
    return _paper_preset("deformable-topk-bbr", ModelConfig(two_stage=True, with_box_refine=True))


def _register_sparse(keep_ratio: float) -> None:
    name = f"sparse-rho{keep_ratio}"

    @register_preset(name)
    def sparse() -> Preset:
        """Sparse DETR: the top-ρ tokens of the DAM scoring network encoded, with encoder aux heads."""
        model = ModelConfig(two_stage=True, with_box_refine=True, keep_ratio=keep_ratio, use_enc_aux_loss=True)
        return _paper_preset(name, model)


for _keep_ratio in KEEP_RATIOS:
    _register_sparse(_keep_ratio)


@register_preset("tiny")
def tiny() -> Preset:
    """Sparse DETR at CPU scale: the same code path, only the numbers differ. Its ResNet-10-T learns from scratch
    (nothing is downloaded), so the backbone trains with BatchNorm, every stage, at the full learning rate,
    with a larger clip norm, on 128-pixel images; no dropout for a short schedule."""
    model = ModelConfig(
        backbone="resnet10t",
        pretrained_backbone="none",
        backbone_norm="batch_norm",
        backbone_frozen_stages=0,
        hidden_dim=64,
        nheads=4,
        enc_layers=3,
        dec_layers=3,
        dim_feedforward=128,
        dropout=0.0,
        num_queries=50,
        two_stage=True,
        with_box_refine=True,
        keep_ratio=0.3,
        use_enc_aux_loss=True,
    )
    recipe = TrainConfig(
        epochs=18, lr_drop=15, batch_size=4, lr=1e-3, lr_backbone=1e-3, clip_max_norm=1.0, image_size=128,
        workers=1, output_dir="runs/tiny",
    )  # fmt: skip
    return Preset(Config("tiny", model), recipe)


@register_preset("tiny-ablation")
def tiny_ablation() -> Preset:
    """Sparse DETR at CPU scale with the paper's compute profile, the built-in ablation's model: tiny's backbone
    and decoder with an encoder of the paper's depth and a wider model, so that the dense encoder is about half
    of the GFLOPs at 128 pixels (as in the paper's R50 at 850x1040) and token sparsity saves what it saves there."""
    preset = tiny()
    model = dataclasses.replace(preset.config.model, hidden_dim=128, nheads=8, enc_layers=6, dim_feedforward=512)
    recipe = dataclasses.replace(preset.train, output_dir="runs/tiny-ablation")
    return Preset(Config("tiny-ablation", model), recipe)


DEFAULT_PRESET = "tiny"  # what a bare `sdetr train` trains (on the built-in dataset only)


def list_presets() -> list[str]:
    """The registered preset names, in registration order."""
    return list(_REGISTRY)


def preset_description(name: str) -> str:
    """The first sentence of the preset function's docstring."""
    doc = (_REGISTRY[name].__doc__ or "").strip()
    return " ".join(doc.split(":")[0].split()) if doc else ""


def check_preset(name: str, error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` naming the registered presets unless ``name`` is one (the registry is read now, so a
    preset registered after import counts)."""
    if name not in _REGISTRY:
        raise error(f"unknown preset {name!r}; presets: {', '.join(_REGISTRY)}")


def create_preset(name: str, backbone: str | None = None) -> Preset:
    """The preset ``name`` (see :func:`list_presets`); ``backbone`` replaces its backbone (``r50``, ``swin-t``,
    a timm ResNet) when given.

    Raises:
        ConfigError: no preset of that name.
    """
    check_preset(name)
    preset = _REGISTRY[name]()
    if backbone is not None:
        preset.config.model.backbone = backbone
    return preset


def get_preset(name: str, backbone: str | None = None) -> Config:
    """The model and loss of the preset ``name`` (see :func:`create_preset`)."""
    return create_preset(name, backbone).config


def train_recipe(preset: str, **overrides: Any) -> TrainConfig:
    """The training recipe of ``preset`` (a registered name; other names, such as a released checkpoint's
    ``"official"``, train with SPEC §6) with ``overrides`` (TrainConfig fields) applied. Overriding
    ``epochs`` but not ``lr_drop`` moves the drop to the same fraction of the run."""
    recipe = create_preset(preset).train if preset in _REGISTRY else TrainConfig(output_dir=f"runs/{preset}")
    changes = dict(overrides)
    if "epochs" in changes and "lr_drop" not in changes:
        changes["lr_drop"] = max(1, round(recipe.lr_drop * changes["epochs"] / recipe.epochs))
    return dataclasses.replace(recipe, **changes)
