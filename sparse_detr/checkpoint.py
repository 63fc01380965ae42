"""Detector checkpoints: this project's files and the released official ones (SPEC §8).

This module owns the format. This project's file is a dict: ``format`` (``"sparse_detr"``), ``version``
(:data:`VERSION`; a newer one is refused), ``config`` (the model and loss, :func:`config_to_dict`), ``model``
(the state dict), and, when given, ``categories`` (class label -> ``{"id", "name"}``) and ``train_config``
(whose ``image_size`` is the size the model trained at). A run folder holds two: ``checkpoint.pth``, the
last, which adds the run's :class:`TrainingCheckpoint` entries (optimizer, schedule, scaler, position,
generator states, sampler seed, initial weights), and ``checkpoint_best.pth``, the weights of the best
validation AP so far, with ``best`` (their epoch and AP). Files of older versions of this project load:
renamed config fields are read under their new names (:mod:`sparse_detr.config.files`), and training
entries they lacked take their defaults. Only plain containers and tensors are stored, so a file loads
with ``weights_only``.

An official file is ``{"model": state_dict, "args": argparse.Namespace, ...}`` whose state dict repeats
every head under a second name (``transformer.decoder.class_embed.*``, …, and in the plain preset the
shared head once per decoder layer) and keeps Swin-T in the Microsoft layout. :func:`model_from_checkpoint`
checks those aliases against their canonical tensors, drops them, converts Swin and loads strictly.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_detr.config import (
    Config,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    check_field,
    check_keep_ratio,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
)
from sparse_detr.data.coco_categories import COCO_CATEGORY_NAMES, COCO_NUM_CLASSES
from sparse_detr.data.transforms import COCO_EVAL_SIZE
from sparse_detr.errors import CheckpointError, ConfigError, MissingFileError
from sparse_detr.models.backbone import swin_from_official
from sparse_detr.models.detector import DeformableDETR, build_model
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import atomic_write
from sparse_detr.utils.state_dict import format_keys, load_state_dict_strict

CHECKPOINT_NAME = "checkpoint.pth"  # a run folder's last checkpoint: what --resume continues
BEST_CHECKPOINT_NAME = "checkpoint_best.pth"  # its weights at the best validation AP so far
FORMAT = "sparse_detr"
VERSION = 1
BODY_PREFIX = "backbone.0.body."
# backbone names of the reference code's --backbone
OFFICIAL_BACKBONES = {"resnet50": "r50", "swin-t": "swin-t"}
# options of the reference code's main.py that are ModelConfig fields of the same name
OFFICIAL_ARGS = (
    *("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout"),
    *("num_feature_levels", "enc_n_points", "dec_n_points", "num_queries"),
    *("two_stage", "with_box_refine", "use_enc_aux_loss", "aux_loss"),
)


def checkpoint_file(path: str | Path, what: str = "checkpoint", last: bool = False) -> Path:
    """``path`` when it is a file; for a run folder its ``checkpoint_best.pth`` (the weights of its best
    validation AP), or its ``checkpoint.pth`` (the last) when ``last`` or when it has no best one yet.

    Raises:
        MissingFileError: neither is there; the message starts with ``what``.
    """
    path = Path(path)
    found = path
    if path.is_dir():
        best = path / BEST_CHECKPOINT_NAME
        found = best if best.is_file() and not last else path / CHECKPOINT_NAME
    if not found.is_file():
        raise MissingFileError(f"{what}: no checkpoint file or run folder with {CHECKPOINT_NAME} at {path}")
    return found


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What a training run's checkpoint stores beside its model, to resume it exactly: the state dicts of the
    optimizer, the learning-rate schedule and the fp16 loss scaler; the position (the next batch is batch
    ``iteration`` of epoch ``epoch``, both from 0, after ``step`` optimizer steps); ``rng``, one entry per
    process (torch, CUDA, numpy and Python generator states); ``sampler`` (its seed: the data order follows
    from seed and position); and where the run's weights started (``initial_weights``)."""

    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int = 0
    iteration: int = 0
    step: int = 0
    rng: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)
    initial_weights: dict[str, Any] | None = None

    @classmethod
    def from_content(cls, content: Mapping[str, Any], path: str | Path) -> TrainingCheckpoint:
        """The training entries of a file :func:`read_checkpoint` read (older files lack some: they take their
        defaults).

        Raises:
            CheckpointError: the file holds a model but no training state (a released checkpoint, or one
                saved for inference), so there is nothing to resume.
        """
        missing = [name for name in ("optimizer", "lr_scheduler", "scaler") if name not in content]
        if missing:
            raise CheckpointError(
                f"{path} holds a model but no training state ({', '.join(missing)}): it cannot be resumed; "
                f"start a new run from its weights with --init {path}"
            )
        return cls(**{field.name: content[field.name] for field in dataclasses.fields(cls) if field.name in content})


def save_checkpoint(
    path: str | Path,
    model: DeformableDETR,
    training: TrainingCheckpoint | None = None,
    categories: Mapping[int, Mapping[str, Any]] | None = None,
    train_config: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (config and state dict), the ``categories`` it predicts, the ``train_config`` it trained
    with and, for a training run, its ``training`` state, or, for a run's best weights, ``best`` (the epoch
    and validation AP they had), atomically: on a full disk the previous file stays and the error says so."""
    content = {"format": FORMAT, "version": VERSION, "config": config_to_dict(model.config)}
    content["model"] = model.state_dict()
    if training is not None:  # not dataclasses.asdict: it would deep-copy every optimizer tensor
        content.update({field.name: getattr(training, field.name) for field in dataclasses.fields(training)})
    if categories is not None:
        content["categories"] = dict(categories)
    if train_config is not None:
        content["train_config"] = dict(train_config)
    if best is not None:
        content["best"] = dict(best)

    def write(tmp: Path) -> None:
        # through a Python file: a failed write raises OSError with its errno (ENOSPC), where torch's own
        # file writer only says "file write failed"
        with tmp.open("wb") as file:
            torch.save(content, file)

    return atomic_write(path, write)


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    path: str | Path,
    preset: str | None = None,
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> DeformableDETR:
    """The detector stored in ``checkpoint`` (the dict :func:`read_checkpoint` read from ``path``, which names
    it in messages), in eval mode, on ``map_location``. ``preset``: another architecture for its weights
    (the backbone and the number of classes still come from the file); ``overrides``: dotted config
    fields applied before building (``{"model.keep_ratio": 0.3}``)."""
    config = checkpoint_config(checkpoint, path, preset)
    if overrides:
        config = apply_overrides(config, dict(overrides))
    model = build_model(config)
    load_state_dict_strict(model, model_state(checkpoint, model), f"checkpoint {path}")
    return model.to(resolve_device(map_location)).eval()


def trained_image_size(checkpoint: Mapping[str, Any]) -> int:
    """The image size (shorter side) a run trained and evaluated at; COCO's 800 for files that do not say
    (the released ones)."""
    return int((checkpoint.get("train_config") or {}).get("image_size", COCO_EVAL_SIZE))


def is_official(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` (the dict :func:`read_checkpoint` returns) is a released official file."""
    return checkpoint.get("format") != FORMAT


def checkpoint_config(checkpoint: Mapping[str, Any], path: str | Path, preset: str | None = None) -> Config:
    """The configuration of the model stored in ``checkpoint``: its own for this project's files, read from
    the ``args`` of official ones; ``preset`` replaces the architecture (backbone and classes kept)."""
    if is_official(checkpoint):
        return official_config(checkpoint.get("args"), checkpoint["model"], preset, path)
    try:
        config = config_from_dict(checkpoint["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path} stores a configuration this version cannot read ({error})") from None
    if preset is not None:
        config = _preset_like(preset, config.model.backbone, config.model.num_classes)
    return config


def model_state(checkpoint: Mapping[str, Any], model: DeformableDETR) -> dict[str, Tensor]:
    """The stored state dict in ``model``'s names (official files: aliases dropped, Swin-T converted)."""
    if is_official(checkpoint):
        return official_to_model_state(checkpoint["model"], model)
    return dict(checkpoint["model"])


@dataclass(frozen=True)
class Category:
    """A class the model predicts: its COCO category id and name."""

    id: int
    name: str


def stored_categories(checkpoint: Mapping[str, Any], num_classes: int) -> dict[int, Category] | None:
    """Class label -> category as the checkpoint knows it: the ``categories`` a training run stored, or the
    COCO 2017 categories for a 91-class file without them (the released checkpoints); None otherwise."""
    stored = checkpoint.get("categories")
    if stored:
        return _parse_categories(stored, "the checkpoint")
    if num_classes == COCO_NUM_CLASSES:
        return {category_id: Category(category_id, name) for category_id, name in COCO_CATEGORY_NAMES.items()}
    return None


def same_category(first: str, second: str) -> bool:
    """Category names match regardless of case and spacing (``"Traffic light"`` is ``"traffic  light"``)."""
    return " ".join(first.lower().split()) == " ".join(second.lower().split())


def category_differences(stored: Mapping[int, Category] | None, dataset_names: Mapping[int, str]) -> list[str]:
    """The dataset's class labels that a checkpoint with ``stored`` categories predicts as another category
    (``"label 1: 'person' here, 'circle' in the checkpoint"``); empty when they agree or the checkpoint
    names no categories."""
    if stored is None:
        return []
    differences = []
    for label, name in sorted(dataset_names.items()):
        category = stored.get(label)
        if category is None or not same_category(category.name, name):
            theirs = repr(category.name) if category is not None else "no class"
            differences.append(f"label {label}: {name!r} here, {theirs} in the checkpoint")
    return differences


def _parse_categories(stored: Any, source: str) -> dict[int, Category]:
    """``stored`` (class label -> ``{"id": int, "name": str}``) as categories; ``source`` names the file in
    the :class:`CheckpointError` that a bad entry raises."""
    expected = "class label -> {'id': int, 'name': str}"
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{source}: 'categories' must map {expected}, got {stored!r}")
    categories = {}
    for label, entry in stored.items():
        try:
            if not (isinstance(entry, Mapping) and isinstance(entry["name"], str)) or isinstance(entry["id"], bool):
                raise TypeError
            categories[int(label)] = Category(int(entry["id"]), entry["name"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: 'categories' must map {expected}; entry {label!r} is {entry!r}") from None
    return categories


def checkpoint_categories(checkpoint: Mapping[str, Any], num_classes: int) -> dict[int, Category]:
    """:func:`stored_categories`, else ``class <label>`` with id = label for every class."""
    categories = stored_categories(checkpoint, num_classes)
    if categories is not None:
        return categories
    return {label: Category(label, f"class {label}") for label in range(num_classes)}


@dataclass(frozen=True)
class InferenceCheckpoint:
    """A checkpoint loaded to run (predict, eval, export, visualize, benchmark): its file, the model in eval
    mode, the size it trained at and the classes it predicts."""

    path: Path
    model: DeformableDETR
    image_size: int  # the shorter side the run trained and evaluated at (see trained_image_size)
    categories: dict[int, Category]  # every class label, named ("class <label>" when the file names none)
    stored_categories: dict[int, Category] | None  # what the file itself says (None: nothing)


def load_for_inference(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    preset: str | None = None,
) -> InferenceCheckpoint:
    """Read the checkpoint file ``path`` (see :func:`read_checkpoint`), build its model (``overrides``: dotted
    config fields over the stored configuration; ``preset``: another architecture for its weights, see
    :func:`model_from_checkpoint`) on ``map_location``, and tell its
    trained image size and categories: what every command that runs a checkpoint needs, in one place."""
    content = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    model = model_from_checkpoint(content, path, preset, map_location, overrides)
    num_classes = model.config.model.num_classes
    return InferenceCheckpoint(
        Path(path), model, trained_image_size(content), checkpoint_categories(content, num_classes),
        stored_categories(content, num_classes),
    )  # fmt: skip


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """The dict stored in ``path``, its tensors on the CPU, unpickled with an allow-list (tensors,
    containers, ``argparse.Namespace``) unless ``trust_checkpoint``.

    Raises:
        CheckpointError: the file is no detector checkpoint, or holds objects that safe loading refuses
            (named).
        MissingFileError: there is no such file.
    """
    if not Path(path).is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        if trust_checkpoint:
            content = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                content = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"cannot read the checkpoint {path}: {error.strerror or error}") from None
    except pickle.UnpicklingError as error:
        untrusted = _untrusted_globals(path, error)
        if untrusted:
            raise CheckpointError(
                f"{path} holds {', '.join(untrusted)} object(s), which safe loading refuses (they could run "
                "code): only for a file you trust, load_model(..., trust_checkpoint=True) unpickles it whole"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(error)})") from None
    except Exception as error:  # torch.load fails in many ways on foreign files
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})") from None
    if not isinstance(content, dict) or not isinstance(content.get("model"), Mapping):
        found = f"keys {format_keys(map(str, content))}" if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path} is not a detector checkpoint: no 'model' state dict ({found})")
    _check_stored(content, path)
    return content


def _check_stored(content: dict, path: str | Path) -> None:
    """Refuse, naming ``path`` and the key, a newer format and the stored entries that later steps read but
    cannot use: ``config`` (checked when the model is built), ``train_config.image_size``, ``categories``."""
    if content.get("format") == FORMAT:
        version = content.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: its format 'version' is {version!r}, not a version number")
        if version > VERSION:
            raise CheckpointError(
                f"{path} was written by a newer sparse_detr (checkpoint format version {version}; this one reads "
                f"up to {VERSION}): upgrade sparse_detr to load it"
            )
        if "config" not in content:
            raise CheckpointError(f"{path} is not a detector checkpoint: it has no 'config' to build the model from")
    train_config = content.get("train_config")
    if train_config is not None:
        if not isinstance(train_config, Mapping):
            raise CheckpointError(f"{path} stores a 'train_config' that is no mapping: {train_config!r}")
        if "image_size" in train_config:
            try:
                check_field(TrainConfig, "image_size", train_config["image_size"], "train_config.image_size")
            except ConfigError as error:
                raise CheckpointError(f"{path} stores a bad training setting: {error}") from None
    if content.get("categories"):
        _parse_categories(content["categories"], str(path))


def official_config(
    args: argparse.Namespace | None, state_dict: Mapping[str, Tensor], preset: str | None, path
) -> Config:
    """The configuration of an official checkpoint: ``preset`` when given, else read from its ``args``."""
    num_classes = state_dict["class_embed.0.weight"].shape[0] if "class_embed.0.weight" in state_dict else 91
    if args is not None and not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path} stores 'args' that are no argparse.Namespace (the reference's): {args!r:.80}")
    backbone = _official_backbone(args, state_dict, path)
    if preset is not None:
        return _preset_like(preset, backbone, num_classes)
    if args is None:
        presets = ", ".join(list_presets())
        raise CheckpointError(f"{path} has no 'args' to tell its architecture; pass preset= (one of {presets})")
    stored = {name: getattr(args, name) for name in OFFICIAL_ARGS if hasattr(args, name)}
    try:
        model = ModelConfig(
            backbone=backbone,
            num_classes=num_classes,
            keep_ratio=check_keep_ratio(getattr(args, "rho", 0.0), "args.rho", dense=True),
            **{name: check_field(ModelConfig, name, value, f"args.{name}") for name, value in stored.items()},
        )
    except ConfigError as error:
        raise CheckpointError(f"{path} stores arguments this model cannot be built from: {error}") from None
    return Config(name=_matching_preset(model), model=model)


def official_to_model_state(state_dict: Mapping[str, Tensor], model: DeformableDETR) -> dict[str, Tensor]:
    """Official state dict -> this model's names: aliases checked against their canonical tensors and
    dropped, the Swin-T body converted to timm's layout. Unknown keys stay, for the strict load to report."""
    own_keys = model.state_dict().keys()
    # the reference's transformer.encoder.*_embed.{i} are the encoder aux heads
    encoder_head_offset = model.head_slots.encoder_aux_heads.start
    converted, aliases = {}, {}
    for key, value in state_dict.items():
        canonical = None if key in own_keys else _alias_target(key, own_keys, encoder_head_offset)
        if canonical is None:
            converted[key] = value
        else:
            aliases[key] = canonical
    for alias, canonical in aliases.items():
        if canonical in converted and not torch.equal(state_dict[alias], converted[canonical]):
            raise CheckpointError(
                f"{alias} should hold the same tensor as {canonical} (the same head registered twice) "
                "but differs: the file is corrupted or was saved from another architecture"
            )
    if model.config.model.backbone == "swin-t":
        body = {key.removeprefix(BODY_PREFIX): value for key, value in converted.items() if key.startswith(BODY_PREFIX)}
        converted = {key: value for key, value in converted.items() if not key.startswith(BODY_PREFIX)}
        converted.update({BODY_PREFIX + key: value for key, value in swin_from_official(body).items()})
    return converted


def _alias_target(key: str, own_keys, encoder_head_offset: int) -> str | None:
    """The canonical key that the official alias ``key`` repeats, or None if ``key`` is no alias."""
    match = re.fullmatch(r"transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if match:
        part, head, index, rest = match.groups()
        index = int(index) + (encoder_head_offset if part == "encoder" else 0)
        return f"{head}.{index}.{rest}"
    match = re.fullmatch(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if match and f"{match[1]}.0.{match[3]}" in own_keys:
        # the plain preset shares one head across decoder layers; the official file lists it per layer
        return f"{match[1]}.0.{match[3]}"
    return None


def _official_backbone(args: argparse.Namespace | None, state_dict: Mapping[str, Tensor], path) -> str:
    if args is not None and hasattr(args, "backbone"):
        if not isinstance(args.backbone, str):
            raise CheckpointError(
                f"{path} stores arguments this model cannot be built from: args.backbone must be a string, "
                f"got {args.backbone!r}"
            )
        return OFFICIAL_BACKBONES.get(args.backbone, args.backbone)
    return "swin-t" if f"{BODY_PREFIX}patch_embed.proj.weight" in state_dict else "r50"


def _preset_like(preset: str, backbone: str, num_classes: int) -> Config:
    config = get_preset(preset, backbone=backbone)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=num_classes))


def _matching_preset(model: ModelConfig) -> str:
    """The preset name whose architecture ``model`` is, or ``"official"`` if none is."""
    for name in list_presets():
        candidate = _preset_like(name, model.backbone, model.num_classes).model
        if candidate == model:
            return name
    return "official"


def _untrusted_globals(path: str | Path, error: pickle.UnpicklingError) -> list[str]:
    """The objects safe loading refused: listed from a zip checkpoint, else named in torch's message
    (the legacy format stops at the first one)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the legacy (non-zip) format
        found = re.findall(r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", str(error))  # module.name
    return [name for name in dict.fromkeys(found) if name != "argparse.Namespace"]


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""
