"""The per-user cache folder, where downloads and builds that can be made again are kept."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparse_detr.errors import OutputError

CACHE_VARIABLE = "SDETR_CACHE_DIR"


def user_cache_dir() -> Path:
    """``$SDETR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/sparse_detr``, else ``~/.cache/sparse_detr``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_detr"


def os_error_reason(error: OSError) -> str:
    """Why an OS call failed, with the path it failed on: ``"File exists: /home/me/.cache"``."""
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason


def unwritable_cache(folder: str | Path, variable: str, error: OSError) -> OutputError:
    """The one-line error for a cache ``folder`` that cannot be written (a read-only home, a full disk): it
    names the folder, why, and the environment ``variable`` that puts this cache elsewhere."""
    reason = os_error_reason(error)
    elsewhere = variable if variable == CACHE_VARIABLE else f"{variable} (or {CACHE_VARIABLE} for every cache)"
    return OutputError(
        f"cannot write to the cache folder {folder} ({reason}): set {elsewhere} to a folder you can write"
    )


def writable_cache_folder(folder: str | Path, variable: str) -> Path:
    """``folder``, created if need be and checked to take a file (nothing is left behind).

    Raises:
        OutputError: :func:`unwritable_cache`'s one line.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as error:
        raise unwritable_cache(folder, variable, error) from None
    return folder
