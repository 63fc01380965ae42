"""Mixed precision: the ``amp`` setting (``"bf16"``, ``"fp16"`` or None) as torch dtypes and autocast."""

from __future__ import annotations

import contextlib

import torch

from sparse_detr.errors import UsageError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, amp: str | None):
    """``torch.autocast`` on ``device`` in ``amp``'s dtype, or nothing for None.

    Raises:
        UsageError: ``amp`` is none of ``bf16``, ``fp16``.
    """
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise UsageError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {amp!r}")
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])
