"""One process at a time in a folder (a run, a sweep): a second one stops with one line naming the first.

The lock is an ``fcntl.flock`` on the file ``.lock`` in the folder. The operating system releases it when
the process ends, however it ends, so a killed process never leaves a lock that blocks: its file (which
records the holder's pid, host and start time for the message) is taken over with a one-line warning. Under
``torchrun`` only rank 0 takes it, as only rank 0 writes; a folder this process already holds is held once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from sparse_detr.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved folder -> how many nested folder_lock blocks of this process hold it


class FolderInUseError(OutputError):
    """Another process holds the folder's lock; the message names it (pid, host, since when)."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``folder``'s lock (created with its parents if need be) for the ``with`` block; ``what`` names
    the work in messages (``"run"``, ``"sweep"``). On leaving, the lock file is removed, and so are the
    folders this lock created when nothing else was written there.

    Raises:
        FolderInUseError: another process holds it: one line with the folder, its pid, host and start time.
        OutputError: the folder cannot be created.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if int(os.environ.get("RANK", 0)) != 0 or fcntl is None:
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = [path for path in (folder, *folder.absolute().parents) if not path.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the {what} folder {folder} ({error.strerror or error})") from None
    fd = _acquire(folder, what)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            (folder / LOCK_NAME).unlink(missing_ok=True)  # while still held: no one locks the old file after
            os.close(fd)
        with contextlib.suppress(OSError):  # rmdir refuses a folder that is not empty
            for path in created:  # a run that stopped before writing anything leaves no folder
                path.rmdir()


def _acquire(folder: Path, what: str) -> int | None:
    """The descriptor of the locked ``folder/.lock``, which now records this process; None where the file
    system has no locks (warned)."""
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(
                    f"{folder} is in use by another {what}: {_describe(holder)}; wait for it to end or stop it, "
                    "or use another folder"
                ) from None
            reason = error.strerror or error
            warnings.warn(f"cannot lock {folder} ({reason}): make sure no other {what} uses it", stacklevel=4)
            return None
        current = _stat(path)
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    previous = _read_holder(fd)
    if previous:
        warnings.warn(f"{folder}: taking over the lock that {_describe(previous)} left when it ended", stacklevel=4)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _read_holder(fd: int) -> dict:
    """The holder a lock file records (empty when it records none)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not said which yet"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock now (``"process 123 on host since ..."``), or None when no process does;
    reads without taking the lock (a shared, non-blocking try that is released at once)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _describe(_read_holder(fd))
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
