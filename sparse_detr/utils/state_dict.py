"""Strict state-dict loading with errors that list what is wrong."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparse_detr.errors import CheckpointError


def format_keys(keys: Iterable[str], limit: int = 8) -> str:
    """``a, b, c`` for short lists, the first ``limit`` names and a count of the others for long ones."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} … and {len(keys) - limit} more"


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module``; any missing or unexpected key or shape mismatch raises one
    ``ValueError`` naming ``source`` and listing the offending keys."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected.keys() & state_dict.keys()
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {format_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {format_keys(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
