"""Typed configuration and the named presets of SPEC §1.

A :class:`Config` (model and loss) and a :class:`TrainConfig` (the training run) are plain data
(:mod:`~sparse_detr.config.types`), each field checked against its type and range
(:mod:`~sparse_detr.config.fields`). The presets (:mod:`~sparse_detr.config.presets`) are a registry: one
function per preset (:func:`register_preset`) returns its model, loss and training recipe together
(:class:`Preset`); :func:`list_presets` names them, :func:`get_preset` gives a model and loss,
:func:`train_recipe` a recipe with overrides. Change fields with :func:`apply_overrides` (dotted keys such as
``"model.keep_ratio"``) or the config files of :mod:`sparse_detr.engine.run_config`, and store them with
:func:`config_to_dict` / :func:`config_from_dict` (:mod:`~sparse_detr.config.files`).
"""

from sparse_detr.config.fields import (
    NON_NEGATIVE_FINITE,
    POSITIVE_FINITE,
    Allowed,
    check_field,
    check_fields,
    check_keep_ratio,
    field_names,
    keep_ratio_range,
)
from sparse_detr.config.files import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_toml,
    train_config_from_dict,
    train_config_to_dict,
)
from sparse_detr.config.presets import (
    DEFAULT_PRESET,
    Preset,
    check_preset,
    create_preset,
    get_preset,
    list_presets,
    preset_description,
    register_preset,
    train_recipe,
)
from sparse_detr.config.types import (
    AMP_MODES,
    BACKBONE_NORMS,
    BACKBONES,
    KEEP_RATIOS,
    MAX_IMAGE_SIZE,
    MAX_QUERIES,
    TOKEN_RANKINGS,
    Config,
    LossConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "AMP_MODES",
    "BACKBONES",
    "BACKBONE_NORMS",
    "DEFAULT_PRESET",
    "KEEP_RATIOS",
    "MAX_IMAGE_SIZE",
    "MAX_QUERIES",
    "NON_NEGATIVE_FINITE",
    "POSITIVE_FINITE",
    "TOKEN_RANKINGS",
    "Allowed",
    "Config",
    "LossConfig",
    "ModelConfig",
    "Preset",
    "TrainConfig",
    "apply_overrides",
    "check_field",
    "check_fields",
    "check_keep_ratio",
    "check_preset",
    "config_from_dict",
    "config_to_dict",
    "create_preset",
    "field_names",
    "get_preset",
    "keep_ratio_range",
    "list_presets",
    "load_toml",
    "preset_description",
    "register_preset",
    "train_config_from_dict",
    "train_config_to_dict",
    "train_recipe",
]
