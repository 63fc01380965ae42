"""Typed configuration and the named presets of SPEC §1.

A :class:`Config` (model and loss) and a :class:`TrainConfig` (the training run) are plain data. The presets
are a registry: one function per preset (:func:`register_preset`) returns its model, loss and training recipe
together (:class:`Preset`); :func:`list_presets` names them, :func:`get_preset` gives a model and loss,
:func:`train_recipe` a recipe with overrides. Change fields with :func:`apply_overrides` (dotted keys such
as ``"model.keep_ratio"``) or the config files of :mod:`sparse_detr.engine.run_config`, and store them with
:func:`config_to_dict` / :func:`config_from_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_detr.errors import ConfigError

BACKBONES = ("r50", "swin-t")
TOKEN_RANKINGS = ("dam", "oam", "random")
KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
BACKBONE_NORMS = ("frozen_bn", "batch_norm")
MAX_IMAGE_SIZE = 8192  # the largest image size (shorter side) a run may ask for, 10x COCO's: beyond, no memory holds it
MAX_QUERIES = 10_000  # decoder self-attention grows with the square of the queries


@dataclass
class ModelConfig:
    """Architecture of Deformable DETR / Sparse DETR.

    ``backbone`` is ``"r50"``, ``"swin-t"`` or a timm ResNet name (``"resnet18"``) for small models.
    ``pretrained_backbone`` is what the backbone starts from when a run trains it: ``"imagenet"`` (the
    reference's weights: torchvision's ResNet-50 IMAGENET1K_V1, the official Swin-T ImageNet-1k),
    ``"timm"`` (timm's default weights for the backbone), a local weights file, or ``"none"`` (random;
    the backbone must then train its norm layers and every stage). ``build_model`` alone never loads
    them: see :mod:`sparse_detr.models.backbone_weights`.
    ``keep_ratio`` is the share ρ of encoder tokens that are encoded (0 = every token, no scoring:
    :attr:`is_sparse` is False).
    ``token_ranking`` picks how tokens are ranked when ρ > 0: ``"dam"`` (scoring network trained on
    the decoder attention map), ``"oam"`` (objectness of a detection head) or ``"random"``.
    ``backbone_norm`` (ResNets only) is ``"frozen_bn"`` as in the reference, which needs pretrained
    statistics, or ``"batch_norm"`` (trained, for backbones learned from scratch); the first
    ``backbone_frozen_stages`` stages do not train (ResNet 1: the stem, 2: the stem and layer1; Swin-T 1: the
    patch embedding, 2: it and stage 1; 2 is the reference's setting for both).
    """

    backbone: str = "r50"
    pretrained_backbone: str = "imagenet"
    backbone_norm: str = "frozen_bn"
    backbone_frozen_stages: int = 2
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91
    two_stage: bool = False
    with_box_refine: bool = False
    keep_ratio: float = 0.0
    use_enc_aux_loss: bool = False
    token_ranking: str = "dam"
    aux_loss: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_dim % self.nheads != 0:
            raise ConfigError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")

    @property
    def is_sparse(self) -> bool:
        """Whether the encoder ranks tokens and encodes only the top ρ (Sparse DETR)."""
        return self.keep_ratio > 0


@dataclass
class LossConfig:
    """Loss weights and matching costs (SPEC §6)."""

    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_prediction_coef: float = 1.0
    focal_alpha: float = 0.25
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Config:
    """Everything needed to rebuild a model and its criterion."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)


AMP_MODES = (None, "bf16", "fp16")  # utils.precision.AMP_DTYPES maps them to dtypes (config stays torch-free)


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
        self.output_dir = str(self.output_dir)
        if self.resume is not None:
            self.resume = str(self.resume)
        if self.init is not None:
            self.init = str(self.init)
            if self.resume is not None:
                raise ConfigError(
                    "init starts a new run from a checkpoint's weights and resume continues a run: give one"
                )
        check_fields(self)
        if self.iters_per_epoch is not None and self.iters_per_epoch < self.grad_accum:
            raise ConfigError(
                f"iters_per_epoch ({self.iters_per_epoch}) must be at least grad_accum ({self.grad_accum})"
            )

    @property
    def batch_size_eval(self) -> int:
        return self.eval_batch_size or self.batch_size


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


def config_to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dict (JSON/YAML-ready)."""
    return dataclasses.asdict(config)


def field_names(cls) -> list[str]:
    """The field names of the dataclass ``cls``, in order."""
    return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Allowed:
    """The values a setting may take, beyond its type: ``test(value)`` and how to say them in a message."""

    test: Callable[[Any], bool]
    text: str


def _at_least(low: int) -> Allowed:
    return Allowed(lambda value: value >= low, f"at least {low}")


def _from_to(low: int, high: int) -> Allowed:
    return Allowed(lambda value: low <= value <= high, f"from {low} to {high}")


def _one_of(choices: tuple) -> Allowed:
    return Allowed(lambda value: value in choices, f"one of {choices}")


POSITIVE_FINITE = Allowed(lambda value: math.isfinite(value) and value > 0, "a positive finite number")
NON_NEGATIVE_FINITE = Allowed(lambda value: math.isfinite(value) and value >= 0, "a finite number >= 0")


def keep_ratio_range(dense: bool = False) -> Allowed:
    """The keep ratios ρ: (0, 1]; with ``dense`` also 0, a model that encodes every token and ranks none."""
    if dense:
        return Allowed(lambda value: 0 <= value <= 1, "a number in [0, 1] (0: every token encoded)")
    return Allowed(lambda value: 0 < value <= 1, "a number in (0, 1]")


def check_keep_ratio(value: Any, key: str = "keep_ratio", dense: bool = False, source: str = "") -> float:
    """``value`` as a keep ratio ρ (see :func:`keep_ratio_range`): the one rule for every ρ a user gives.

    Raises:
        ConfigError: ``"{source}{key} must be a number in (0, 1], got {value!r}"``.
    """
    allowed = keep_ratio_range(dense)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and allowed.test(value)):
        raise ConfigError(f"{source}{key} must be {allowed.text}, got {value!r}")
    return float(value)


# the allowed values of the fields whose type alone does not say them; None (an unset optional field) passes
FIELD_RANGES: dict[tuple[type, str], Allowed] = {
    (ModelConfig, "token_ranking"): _one_of(TOKEN_RANKINGS),
    (ModelConfig, "backbone_norm"): _one_of(BACKBONE_NORMS),
    (ModelConfig, "backbone_frozen_stages"): _from_to(0, 5),
    (ModelConfig, "hidden_dim"): Allowed(lambda value: value > 0 and value % 32 == 0, "a positive multiple of 32"),
    **{(ModelConfig, name): _at_least(1) for name in ("nheads", "enc_layers", "dec_layers", "dim_feedforward")},
    (ModelConfig, "dropout"): Allowed(lambda value: 0 <= value < 1, "a number in [0, 1)"),
    (ModelConfig, "num_feature_levels"): _at_least(3),
    (ModelConfig, "enc_n_points"): _at_least(1),
    (ModelConfig, "dec_n_points"): _at_least(1),
    (ModelConfig, "num_queries"): _from_to(1, MAX_QUERIES),
    (ModelConfig, "num_classes"): _at_least(1),
    (ModelConfig, "keep_ratio"): keep_ratio_range(dense=True),
    **{(LossConfig, name): NON_NEGATIVE_FINITE for name in field_names(LossConfig) if name != "focal_alpha"},
    (LossConfig, "focal_alpha"): Allowed(lambda value: 0 <= value <= 1, "a number in [0, 1]"),
    **{(TrainConfig, name): POSITIVE_FINITE for name in ("lr", "lr_backbone", "lr_linear_proj_mult")},
    (TrainConfig, "weight_decay"): NON_NEGATIVE_FINITE,
    (TrainConfig, "clip_max_norm"): NON_NEGATIVE_FINITE,
    (TrainConfig, "amp"): _one_of(tuple(mode for mode in AMP_MODES if mode is not None)),
    (TrainConfig, "image_size"): _from_to(1, MAX_IMAGE_SIZE),
    **{(TrainConfig, name): _at_least(1) for name in ("epochs", "lr_drop", "batch_size", "grad_accum")},
    **{(TrainConfig, name): _at_least(1) for name in ("eval_every_epochs", "log_every", "eval_batch_size")},
    (TrainConfig, "iters_per_epoch"): _at_least(1),
    (TrainConfig, "seed"): _from_to(0, 2**32 - 1),
    (TrainConfig, "workers"): _at_least(0),
    (TrainConfig, "checkpoint_every_iters"): _at_least(0),
}


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field(cls, name: str, value: Any, key: str | None = None, source: str = "") -> Any:
    """``value`` for field ``name`` of the dataclass ``cls``, checked against the field's type and its
    :data:`FIELD_RANGES` entry.

    Integers are accepted for float fields (and returned as floats), lists for tuple fields. Messages
    call the field ``key`` (default ``name``; e.g. ``"train.lr"``) and start with ``source`` (e.g.
    ``"run.toml: "``).

    Raises:
        ConfigError: the key is not a field (the message lists the fields), or the value has a wrong type or
            is out of range (the message says the allowed values).
    """
    key = key or name
    if name not in field_names(cls):
        raise ConfigError(f"{source}unknown config key {key!r}; known: {', '.join(field_names(cls))}")
    kind = _type_hints(cls)[name]
    try:
        value = _checked(kind, value)
    except TypeError:
        raise ConfigError(f"{source}{key} must be {_describe(kind)}, got {value!r}") from None
    allowed = FIELD_RANGES.get((cls, name))
    if allowed is not None and value is not None and not allowed.test(value):
        raise ConfigError(f"{source}{key} must be {allowed.text}, got {value!r}")
    return value


def check_fields(instance) -> None:
    """Check every field of a configuration dataclass ``instance`` with :func:`check_field`, storing the
    converted values (a list as a tuple, an integer as a float)."""
    for name in field_names(type(instance)):
        setattr(instance, name, check_field(type(instance), name, getattr(instance, name)))


def _checked(kind: Any, value: Any) -> Any:
    """``value`` as type ``kind`` (str, bool, int, float, optionals and homogeneous tuples); TypeError if it
    is not one."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _checked(option, value)
                except TypeError:
                    pass
        raise TypeError
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_checked(typing.get_args(kind)[0], item) for item in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (str, bool) and isinstance(value, kind):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [_describe(option) for option in typing.get_args(kind) if option is not type(None)]
        return " or ".join(options) + (" (or left unset)" if type(None) in typing.get_args(kind) else "")
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(kind)[0])}s"
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(kind, str(kind))


# dataclass fields that hold another dataclass
_NESTED = {(Config, "model"): ModelConfig, (Config, "loss"): LossConfig}


# fields renamed since checkpoints were first written: old name -> new name
_RENAMED = {(ModelConfig, "saliency_criterion"): "token_ranking"}
# fields that older checkpoints stored as None, and what that is called today
_NONE_WAS = {(ModelConfig, "pretrained_backbone"): "none"}


def _from_dict(cls, data: Any, path: str):
    """``cls`` from the plain dict ``data``, every value checked (:func:`check_field`) and named by its
    dotted key (``path`` + field name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or 'config'} must be a table of fields, got {data!r}")
    data = {_RENAMED.get((cls, key), key): value for key, value in data.items()}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(f"unknown {path or 'config'} field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        nested = _NESTED.get((cls, key))
        if nested is not None:
            kwargs[key] = _from_dict(nested, value, f"{path}{key}.")
            continue
        if value is None and (cls, key) in _NONE_WAS:
            value = _NONE_WAS[(cls, key)]
        kwargs[key] = check_field(cls, key, value, f"{path}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict`; missing fields take their defaults, unknown ones raise ConfigError."""
    return _from_dict(Config, data, "")


def load_toml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """The parsed TOML file ``path``; a missing or malformed file raises :class:`ConfigError` naming it
    (``kind`` says what the file is for)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: drops a byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"{kind} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` with dotted-key overrides, e.g. ``{"model.keep_ratio": 0.3, "name": "x"}``.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key (and the valid
    keys); field checks run again on the result.
    """
    data = config_to_dict(config)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        cls = {"": Config, "model": ModelConfig, "loss": LossConfig}.get(section)
        if cls is None:
            raise ConfigError(f"unknown config key {key!r}: sections are model and loss")
        node = data[section] if section else data
        if not section and leaf in ("model", "loss"):
            example = field_names(_NESTED[(Config, leaf)])[0]
            raise ConfigError(f"{key!r} is a section: set its fields, such as {key}.{example}")
        node[leaf] = check_field(cls, leaf, value, key)
    return config_from_dict(data)


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
