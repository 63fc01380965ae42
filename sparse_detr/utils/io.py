"""Atomic file writes: a reader (or a crash) never sees a half-written report or checkpoint; and the checks
that a folder can be written before work starts."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sparse_detr.errors import OutputError, SparseDetrError

TEMPORARY_SUFFIX = ".tmp"  # atomic writes go to ".<name>.<random>.tmp" beside their target
# what torch's file writer (torch.save to a path, ONNX export) says when the disk takes no more bytes
_STREAM_WRITE_FAILURES = ("file write failed", "failed writing file", "unexpected pos", "no space left on device")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``. On failure
    ``path`` keeps its previous content and the temporary file is removed.

    Raises:
        OutputError: the folder or file cannot be written, the disk is full, or torch's file writer failed
            (named: ``path``, not the temporary file).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(_write_failure(path, error)) from None
        raise OutputError(f"cannot write {path} ({error.strerror or error}): check the folder's permissions") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports and checkpoints are meant to be shared
        os.replace(tmp, path)
    except OSError as error:
        if isinstance(error, SparseDetrError):
            raise
        raise OutputError(_write_failure(path, error)) from None
    except RuntimeError as error:
        if not any(failure in str(error).lower() for failure in _STREAM_WRITE_FAILURES):
            raise
        raise OutputError(_write_failure(path, error)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_failure(path: Path, error: OSError | RuntimeError) -> str:
    """Why ``path`` could not be written, in one line; a full disk (or quota) is said as such."""
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(error).lower()
    if full:
        return f"cannot write {path}: the disk is full (no space left on device); free some space and run again"
    if isinstance(error, OSError):
        return f"cannot write {path} ({error.strerror or error})"
    reason = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
    return f"cannot write {path}: the write failed ({reason}); check that its disk has free space"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_writable(folder: str | Path) -> Path:
    """Check, before any work is done, that ``folder`` can be written: it, or its nearest existing parent
    when it does not exist yet, takes a file. Nothing is left behind.

    Raises:
        OutputError: naming the folder and why.
    """
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check.", suffix=TEMPORARY_SUFFIX):
            pass
    except OSError as error:
        raise OutputError(
            f"cannot write to {folder} ({error.strerror or error}): choose another folder or fix its permissions"
        ) from None
    return folder


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that atomic writes killed midway left in ``folder``; returns them.

    Only for a folder that one process writes (a run folder at the start of its run)."""
    removed = []
    for leftover in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
