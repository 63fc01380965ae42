"""A run's whole configuration, resolved from layers: preset < config file < ``--set`` < explicit options.

A config file is TOML with an optional top-level ``preset`` and the tables ``[data]``
(:class:`~sparse_detr.data.source.DataSource` fields), ``[model]``, ``[loss]`` (the preset's
:class:`~sparse_detr.config.ModelConfig` / :class:`~sparse_detr.config.LossConfig` fields) and ``[train]``
(:class:`~sparse_detr.engine.TrainConfig` fields over the preset's training recipe). Every run folder
stores its resolved configuration as ``config.toml`` in this format, so ``--config`` reads it back.
Settings travel as one flat dict of dotted keys (``"model.keep_ratio"``, ``"train.lr"``, ``"preset"``),
each checked against its field's type where it is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from sparse_detr.config import (
    DEFAULT_PRESET,
    Config,
    LossConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    check_field,
    config_to_dict,
    field_names,
    get_preset,
    list_presets,
    load_toml,
    train_config_to_dict,
    train_recipe,
)
from sparse_detr.config.files import TOMLDecodeError, parse_toml
from sparse_detr.data.source import DataSource
from sparse_detr.errors import ConfigError
from sparse_detr.zoo import default_checkpoint

SECTIONS: dict[str, type] = {"data": DataSource, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
# field name -> its section (no field name appears in two sections)
_FIELD_SECTIONS = {name: section for section, cls in SECTIONS.items() for name in field_names(cls)}
CONFIG_FILE_NAME = "config.toml"


@dataclass(frozen=True)
class RunConfig:
    """What a training run needs: the model and loss (``config``, named after its preset), the training
    settings and where the data is."""

    config: Config
    train: TrainConfig
    data: DataSource

    @property
    def preset(self) -> str:
        return self.config.name

    def to_toml(self) -> str:
        """The config file that gives this run back (unset optional fields are left out)."""
        model = config_to_dict(self.config)
        document = {
            "preset": self.preset,
            "data": dataclasses.asdict(self.data),
            "model": model["model"],
            "loss": model["loss"],
            "train": train_config_to_dict(self.train),
        }
        document = {
            key: {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
            for key, value in document.items()
        }
        header = "# sparse_detr run configuration: `sdetr train --config FILE` reads it back\n"
        return header + tomli_w.dumps(document)


def check_setting(key: str, value: Any, source: str = "") -> Any:
    """``value`` checked (and converted) for the dotted ``key``; :class:`ConfigError` names the key,
    ``source`` (a file, ``--set``) and the valid keys or the expected type."""
    section, _, name = key.rpartition(".")
    if not section:
        if key != "preset":
            raise ConfigError(f"{source}unknown key {key!r}; known: preset and the tables {', '.join(SECTIONS)}")
        if not isinstance(value, str):
            raise ConfigError(f'{source}preset must be a string such as "sparse-rho0.1", got {value!r}')
        return value
    if section not in SECTIONS:
        raise ConfigError(f"{source}unknown table {section!r} in {key!r}; tables: {', '.join(SECTIONS)}")
    return check_field(SECTIONS[section], name, value, key, source)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a config file as checked dotted keys; errors name the file, table and key."""
    path = Path(path)
    document = load_toml(path)
    source = f"{path}: "
    settings = {}
    for key, value in document.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}{key} must be a table ([{key}]), got {value!r}")
            for name, item in value.items():
                if isinstance(item, dict):
                    raise ConfigError(f"{source}[{key}] {name} is a table; [{key}] holds plain values")
                settings[f"{key}.{name}"] = check_setting(f"{key}.{name}", item, source)
        else:
            settings[key] = check_setting(key, value, source)
    return settings


def parse_set(item: str) -> tuple[str, Any]:
    """One ``--set key=value``: the value is read as a TOML value (``1e-4``, ``true``, ``[1, 2]``,
    ``"text"``), or as a plain string when it is none (``swin-t``)."""
    key, equals, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not equals or not key:
        raise ConfigError(f"--set expects key=value such as model.keep_ratio=0.2, got {item!r}")
    try:
        value = parse_toml(f"value = {text}")["value"]
    except TOMLDecodeError:
        value = text
    return key, check_setting(key, value, "--set ")


def option_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line options named after configuration fields as dotted settings: ``epochs`` ->
    ``train.epochs``, ``keep_ratio`` -> ``model.keep_ratio``, ``root`` -> ``data.root``; ``preset`` stays.
    Unset (None) options are left out; paths become strings.

    Raises:
        KeyError: an option that no section has a field for (a programming error in the caller).
    """
    settings = {}
    for name, value in options.items():
        if value is None:
            continue
        key = name if name == "preset" else f"{_FIELD_SECTIONS[name]}.{name}"
        settings[key] = str(value) if isinstance(value, Path) else value
    return settings


def merged_settings(
    config_file: str | Path | None = None,
    sets: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``run`` (what a run folder says, see :func:`run_folder_settings`) < config file < ``--set`` items <
    ``options`` (dotted keys; None values are left out), checked.

    A layer that names a dataset folder (``data.root``) replaces the explicit paths of the layers below,
    and explicit paths replace a folder below: ``--data`` over a run's config.toml evaluates that folder.
    """
    file_layer = read_config_file(config_file) if config_file is not None else {}
    set_layer = dict(parse_set(item) for item in sets)
    option_layer = {key: check_setting(key, value) for key, value in (options or {}).items() if value is not None}
    settings: dict[str, Any] = {}
    for layer in (run or {}, file_layer, set_layer, option_layer):
        if "data.root" in layer:
            settings = {key: value for key, value in settings.items() if not key.startswith("data.")}
        elif any(key.startswith("data.") for key in layer):
            settings.pop("data.root", None)
        settings.update(layer)
    return settings


def run_folder_of(checkpoint: str | Path | None) -> Path | None:
    """The run folder a ``--checkpoint`` value names (the folder itself, or the folder of a checkpoint file
    in it): one that holds the run's ``config.toml``; None for anything else (a zoo name, a lone file).
    None names what a bare ``sdetr train`` writes."""
    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    folder = path if path.is_dir() else path.parent
    return folder if (folder / CONFIG_FILE_NAME).is_file() else None


def run_folder_settings(folder: Path | None) -> dict[str, Any]:
    """What run ``folder`` (see :func:`run_folder_of`) says about evaluating its model, from its
    ``config.toml``: its data (``data.*``), image size and evaluation batch (padding differs with the batch,
    so the run's own batch gives back the AP the run measured); empty for no run folder."""
    if folder is None:
        return {}
    settings = read_config_file(folder / CONFIG_FILE_NAME)
    taken = {key: value for key, value in settings.items() if key.startswith("data.") or key == "train.image_size"}
    batch = settings.get("train.eval_batch_size") or settings.get("train.batch_size")
    return taken | ({"train.eval_batch_size": batch} if batch else {})


def section(settings: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The fields of table ``name`` in dotted ``settings`` (``{"lr": ...}`` from ``"train.lr"``)."""
    prefix = f"{name}."
    return {key.removeprefix(prefix): value for key, value in settings.items() if key.startswith(prefix)}


def model_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted ``model.*`` and ``loss.*`` settings: what changes a model that is loaded or built."""
    return {key: value for key, value in settings.items() if key.startswith(("model.", "loss."))}


@dataclass(frozen=True)
class EvalSettings:
    """What ``sdetr eval`` (:func:`~sparse_detr.engine.evaluate.evaluate_checkpoint`) runs with, resolved once
    from a config file, ``--set`` and options (:meth:`from_settings`).

    ``data`` names the validation split; ``overrides`` (dotted ``model.*`` / ``loss.*``) change the loaded
    model; ``keep_ratio`` runs it at another ρ; ``image_size`` (default the run's, else 800), ``batch_size``,
    ``workers``, ``device``, ``amp``, ``compile`` and ``fast`` say how it runs (see
    :func:`~sparse_detr.models.prepare_for_inference`); ``allow_other_categories`` evaluates a checkpoint
    trained on other categories than the split's."""

    data: DataSource = dataclasses.field(default_factory=DataSource)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    keep_ratio: float | None = None
    image_size: int | None = None
    batch_size: int = 2  # as the reference evaluates
    workers: int = 2
    device: str | None = None
    amp: str | None = None
    compile: bool = False
    fast: bool = True
    allow_other_categories: bool = False
    trust_checkpoint: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **options: Any) -> EvalSettings:
        """The settings that dotted ``settings`` (see :func:`merged_settings`) give: ``[data]``, ``[model]``
        and ``[loss]``, and of ``[train]`` the evaluation's fields; ``options`` (``compile``, ...) on top."""
        train, overrides = section(settings, "train"), model_overrides(settings)
        keep_ratio = overrides.pop("model.keep_ratio", None)
        taken = {"eval_batch_size": "batch_size", "image_size": "image_size", "workers": "workers", "device": "device",
                 "amp": "amp", "allow_other_categories": "allow_other_categories"}  # fmt: skip
        fields = {name: train[key] for key, name in taken.items() if key in train}
        return cls(DataSource(**section(settings, "data")), overrides, keep_ratio, **fields, **options)


def resolve_run_config(
    settings: Mapping[str, Any], base_config: Config | None = None, default_preset: str = DEFAULT_PRESET
) -> RunConfig:
    """The run that ``settings`` (see :func:`merged_settings`) describe.

    The model starts from ``settings["preset"]``; without one, from ``base_config`` (a checkpoint's
    architecture when fine-tuning) or, on the built-in dataset only, ``default_preset``. ``[model]`` and
    ``[loss]`` change it; ``[train]`` changes the preset's training recipe (:func:`train_recipe`).
    """
    data = DataSource(**section(settings, "data"))
    preset = settings.get("preset")
    if preset is not None:
        config = get_preset(preset)
    elif base_config is not None:
        config = base_config
    elif data.is_builtin:
        config = get_preset(default_preset)
    else:
        raise ConfigError(
            f"a dataset needs a model preset: pass --preset (one of {', '.join(list_presets())}) or a config file "
            f'with preset = "..." (`{default_preset}` is the default for the built-in dataset only)'
        )
    config = apply_overrides(config, model_overrides(settings))
    train = train_recipe(config.name, **section(settings, "train"))
    return RunConfig(config, train, data)
