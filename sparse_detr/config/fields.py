"""Checking configuration fields: each value against its field's type and declared range, with one-line
messages that name the key and say the allowed values."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparse_detr.errors import ConfigError


def field_names(cls) -> list[str]:
    """The field names of the dataclass ``cls``, in order."""
    return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Allowed:
    """The values a setting may take, beyond its type: ``test(value)`` and how to say them in a message."""

    test: Callable[[Any], bool]
    text: str


def at_least(low: int) -> Allowed:
    return Allowed(lambda value: value >= low, f"at least {low}")


def from_to(low: int, high: int) -> Allowed:
    return Allowed(lambda value: low <= value <= high, f"from {low} to {high}")


def one_of(choices: tuple) -> Allowed:
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


_RANGES: dict[tuple[type, str], Allowed] = {}


def declare_ranges(cls: type, ranges: dict[str, Allowed]) -> None:
    """Declare the allowed values of fields of ``cls`` whose type alone does not say them (the configuration
    types do, each below its class); None, an unset optional field, always passes."""
    for name in ranges:
        if name not in field_names(cls):
            raise AssertionError(f"{cls.__name__} has no field {name!r}")
    _RANGES.update({(cls, name): allowed for name, allowed in ranges.items()})


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field(cls, name: str, value: Any, key: str | None = None, source: str = "") -> Any:
    """``value`` for field ``name`` of the dataclass ``cls``, checked against the field's type and its
    declared range (:func:`declare_ranges`).

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
    allowed = _RANGES.get((cls, name))
    if allowed is not None and value is not None and not allowed.test(value):
        raise ConfigError(f"{source}{key} must be {allowed.text}, got {value!r}")
    return value


def check_fields(instance) -> None:
    """Check every field of a configuration dataclass ``instance`` with :func:`check_field`, storing the
    converted values (a list as a tuple, an integer as a float)."""
    for name in field_names(type(instance)):
        object.__setattr__(instance, name, check_field(type(instance), name, getattr(instance, name)))  # frozen too


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
        item = _describe(typing.get_args(kind)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s"
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(kind, str(kind))
