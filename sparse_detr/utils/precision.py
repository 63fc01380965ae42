"""Mixed precision: the ``amp`` setting (``"bf16"``, ``"fp16"`` or None) as torch dtypes and autocast."""

from __future__ import annotations

import contextlib

import torch

from sparse_detr.errors import UsageError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the names config.AMP_MODES allows


def check_amp(amp: str | None, option: str = "amp") -> None:
    """Refuse an ``amp`` that is none of ``bf16``, ``fp16`` or None.

    Raises:
        UsageError: naming ``option``.
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise UsageError(f"{option} must be {' or '.join(AMP_DTYPES)} (or unset: float32), got {amp!r}")


def autocast(device: torch.device | str, amp: str | None):
    """``torch.autocast`` on ``device`` in ``amp``'s dtype, or nothing for None.

    Raises:
        UsageError: ``amp`` is none of ``bf16``, ``fp16``.
    """
    check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])
