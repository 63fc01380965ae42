"""Where a new run's weights start: the backbone's pretrained weights, or a whole checkpoint (fine-tuning).

Fine-tuning (``TrainConfig.init``) loads every tensor of a released or own checkpoint whose name and shape
fit the new model. A checkpoint of another backbone gives none of the backbone's: the backbone then starts
from its configured pretrained weights (``model.pretrained_backbone``), as in a run from scratch, and a
frozen backbone without them is refused, never left random. The classification heads follow the
categories: when the checkpoint and the new dataset both name theirs, each class row of a category with the
same name is carried over and the others keep the model's own initialization (the focal prior); without
names, the heads load only when their shapes fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_detr.checkpoint import checkpoint_config, model_state, read_checkpoint, same_category, stored_categories
from sparse_detr.config import Config
from sparse_detr.errors import ConfigError
from sparse_detr.models import DeformableDETR
from sparse_detr.models.backbone_weights import BackboneWeights, check_backbone_trainable, resolve_backbone_weights
from sparse_detr.utils.io import file_sha256
from sparse_detr.utils.state_dict import format_keys
from sparse_detr.zoo import resolve_checkpoint

CLASS_HEAD = "class_embed"  # every classification head's parameters carry this in their name
BACKBONE = "backbone."  # the backbone's parameters and buffers start with this


@dataclass(frozen=True)
class InitCheckpoint:
    """The checkpoint a fine-tuning run starts from: as given (a path or zoo name), the file, its sha256, and
    whether its backbone is the model's (``with_backbone``; else the backbone's tensors are not loaded)."""

    source: str
    file: Path
    sha256: str
    with_backbone: bool = True


@dataclass(frozen=True)
class InitialWeights:
    """What a new run starts from: ``checkpoint`` (fine-tuning) and/or ``backbone`` pretrained weights (a
    checkpoint of another backbone comes with them), or nothing (random weights, the ``none`` source)."""

    backbone: BackboneWeights | None = None
    checkpoint: InitCheckpoint | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for the run folder and the checkpoint."""
        record: dict[str, Any] = {"backbone": self.backbone.to_dict() if self.backbone else None}
        if self.checkpoint is not None:
            init = self.checkpoint
            record["init"] = {"source": init.source, "file": str(init.file), "sha256": init.sha256}
            record["init"]["with_backbone"] = init.with_backbone
        return record


def resolve_initial_weights(config: Config, init: str | None = None) -> InitialWeights:
    """Fetch (or find in the caches) the files a new run of ``config`` starts from, before any work.

    ``init`` (a checkpoint file, run folder or zoo name) replaces the backbone's pretrained weights when it
    holds the same backbone; one of another backbone comes with them.

    Raises:
        WeightsUnavailableError / CheckpointUnavailableError: a file that cannot be had (one line that
            says which and how to pass it).
        ConfigError: random backbone weights with frozen layers.
    """
    if init is None:
        check_backbone_trainable(config.model)
        return InitialWeights(backbone=resolve_backbone_weights(config.model))

    path = resolve_checkpoint(init)
    source_backbone = checkpoint_config(read_checkpoint(path), path).model.backbone
    if source_backbone == config.model.backbone:
        return InitialWeights(checkpoint=InitCheckpoint(str(init), path, file_sha256(path)))
    try:
        check_backbone_trainable(config.model)
    except ConfigError as error:
        raise ConfigError(
            f"--init {init} holds a {source_backbone} backbone, not this model's {config.model.backbone}, so "
            f"the backbone starts from model.pretrained_backbone, and {error}"
        ) from None
    checkpoint = InitCheckpoint(str(init), path, file_sha256(path), with_backbone=False)
    return InitialWeights(backbone=resolve_backbone_weights(config.model), checkpoint=checkpoint)


def init_model_config(init: str) -> Config:
    """The architecture of the checkpoint ``init`` (a file, run folder or zoo name): a fine-tuning run's
    model unless a preset is given."""
    path = resolve_checkpoint(init)
    return checkpoint_config(read_checkpoint(path), path)


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did, for the run's log."""

    loaded: list[str] = field(default_factory=list)
    class_heads: list[str] = field(default_factory=list)
    carried_classes: list[str] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_in_checkpoint: list[str] = field(default_factory=list)
    other_backbone: list[str] = field(default_factory=list)

    def lines(self, source: str) -> list[str]:
        """A short table: loaded, re-initialized, skipped and missing tensors."""
        rows = [f"initialized from {source}:", f"  loaded            {len(self.loaded)} tensors"]
        if self.class_heads:
            carried = ", ".join(self.carried_classes) or "none"
            rows.append(
                f"  class heads       {len(self.class_heads)} tensors re-initialized for the new classes; "
                f"rows carried over by name: {carried}"
            )
        if self.other_backbone:
            rows.append(
                f"  backbone          {len(self.other_backbone)} tensors of another backbone not loaded (this "
                "model's starts from model.pretrained_backbone)"
            )
        if self.skipped:
            keys = format_keys(self.skipped, 4)
            rows.append(f"  skipped           {len(self.skipped)} (not in this model, or another shape): {keys}")
        if self.not_in_checkpoint:
            keys = format_keys(self.not_in_checkpoint, 4)
            rows.append(f"  not in checkpoint {len(self.not_in_checkpoint)} (kept their initialization): {keys}")
        return rows


@torch.no_grad()
def init_from_checkpoint(
    model: DeformableDETR, path: str | Path, class_names: Mapping[int, str] | None = None, with_backbone: bool = True
) -> InitReport:
    """Load the tensors of the checkpoint ``path`` that fit ``model`` (same name and shape) into it; with
    ``with_backbone`` false (a checkpoint of another backbone), none of the backbone's.

    Args:
        class_names: label -> category name of the new dataset. When the checkpoint names its categories
            too (own runs store them; the released files are COCO), the class rows of categories with the
            same name are carried over and the other rows keep the model's initialization; a class set that
            equals the checkpoint's, label for label, loads as is.
    """
    checkpoint = read_checkpoint(path)
    stored = model_state(checkpoint, model)
    own = model.state_dict()
    num_classes = _stored_num_classes(stored)
    old_names = stored_categories(checkpoint, num_classes) if num_classes else None
    rows = _class_rows(old_names, class_names)

    report = InitReport()
    report.not_in_checkpoint = sorted(own.keys() - stored.keys())
    for key, value in stored.items():
        target = own.get(key)
        if not with_backbone and key.startswith(BACKBONE):
            report.other_backbone.append(key)
        elif CLASS_HEAD in key and rows is not None and target is not None and target.shape[1:] == value.shape[1:]:
            for new_label, old_label in rows.items():
                target[new_label] = value[old_label]
            report.class_heads.append(key)
        elif target is not None and target.shape == value.shape:
            target.copy_(value)
            report.loaded.append(key)
        else:
            report.skipped.append(key)
    if rows is not None and class_names is not None:
        report.carried_classes = [class_names[label] for label in sorted(rows)]
        report.new_classes = [name for label, name in sorted(class_names.items()) if label not in rows]
    return report


def _stored_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    heads = [value for key, value in state.items() if CLASS_HEAD in key and key.endswith(".bias")]
    return int(heads[0].shape[0]) if heads else None


def _class_rows(old: Mapping[int, Any] | None, new: Mapping[int, str] | None) -> dict[int, int] | None:
    """New label -> checkpoint label of the class rows to carry over, or None to load the heads as they
    are (both sides name the same categories label for label, or neither side names them)."""
    if old is None or new is None:
        return None
    old_names = {label: category.name for label, category in old.items()}
    if old_names == dict(new):
        return None
    rows = {}
    for label, name in new.items():
        match = next((old_label for old_label, old_name in old_names.items() if same_category(old_name, name)), None)
        if match is not None:
            rows[label] = match
    return rows
