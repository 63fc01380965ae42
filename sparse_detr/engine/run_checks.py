"""What a training run checks before it does any work: the image size against the queries, and that a
checkpoint to resume holds the same model and categories."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparse_detr.checkpoint import category_differences, stored_categories
from sparse_detr.config import Config, TrainConfig, config_from_dict, config_to_dict
from sparse_detr.data import scaled_sizes
from sparse_detr.errors import ConfigError, UsageError

# fields that may differ between a run and the checkpoint it resumes
_RESUMABLE_DIFFERENCES = ("pretrained_backbone",)


def check_input_size(model_config: Config, train_config: TrainConfig) -> None:
    """Two-stage models take their queries from the encoder tokens: refuse an image size whose smallest
    training scale gives fewer tokens than queries.

    Raises:
        ConfigError: naming the image size to use instead.
    """
    model = model_config.model
    if not model.two_stage:
        return

    def tokens(image_size: int) -> int:
        side = min(scaled_sizes(image_size).scales)  # every training image's shorter side is at least this
        return sum(math.ceil(side / 2 ** (3 + level)) ** 2 for level in range(model.num_feature_levels))

    if tokens(train_config.image_size) < model.num_queries:
        enough = next(size for size in itertools.count(train_config.image_size) if tokens(size) >= model.num_queries)
        raise ConfigError(
            f"image size {train_config.image_size} gives as few as {tokens(train_config.image_size)} encoder "
            f"tokens at the smallest training scale, fewer than the {model.num_queries} queries: use "
            f"--image-size {enough} or more, or fewer queries (model.num_queries)"
        )


def check_resumable(
    checkpoint: Mapping[str, Any], model_config: Config, category_names: Mapping[int, str], path: Path,
    allow_other_categories: bool = False,
) -> None:  # fmt: skip
    """A resumed checkpoint must hold the architecture and losses being trained, and (unless
    ``allow_other_categories``) have been trained on the same categories.

    Raises:
        UsageError: naming what differs and what to do.
    """
    stored = config_from_dict(checkpoint["config"])
    current, before = config_to_dict(model_config), config_to_dict(stored)
    different = [
        f"{section}.{key}"
        for section in ("model", "loss")
        for key in current[section]
        if key not in _RESUMABLE_DIFFERENCES and before[section][key] != current[section][key]
    ]
    if different:
        raise UsageError(
            f"{path} was trained with another configuration ({', '.join(different)} differ); "
            "resume with the same preset and options, or use a new --output-dir"
        )
    differences = category_differences(stored_categories(checkpoint, stored.model.num_classes), category_names)
    if differences and not allow_other_categories:
        raise UsageError(
            f"{path} was trained on other categories ({len(differences)} differ; {differences[0]}): "
            "resume on the data it started with, fine-tune it on this data with --init, or pass "
            "--allow-other-categories"
        )
