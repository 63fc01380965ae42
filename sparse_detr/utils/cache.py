"""The per-user cache folder, where downloads and builds that can be made again are kept."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sparse_detr``, ``~/.cache/sparse_detr`` when the variable is unset or empty."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_detr"
