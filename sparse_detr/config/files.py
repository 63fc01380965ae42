"""Configurations as plain data and TOML: to and from nested dicts (older checkpoints' field names and
values included), dotted-key overrides, and reading TOML files with one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sparse_detr.config.fields import check_field, field_names
from sparse_detr.config.types import Config, LossConfig, ModelConfig, TrainConfig
from sparse_detr.errors import ConfigError


def config_to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dict (JSON/YAML-ready)."""
    return dataclasses.asdict(config)


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


TOMLDecodeError = tomllib.TOMLDecodeError


def parse_toml(text: str) -> dict[str, Any]:
    """The TOML document ``text`` (raises :data:`TOMLDecodeError`); Python 3.10 reads it with ``tomli``."""
    return tomllib.loads(text)


def load_toml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """The parsed TOML file ``path``; a missing or malformed file raises :class:`ConfigError` naming it
    (``kind`` says what the file is for)."""
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
