"""The project's own errors: problems a user can fix, each told in one line that names the file or option
and what to do.

``sdetr`` prints these as one red line (the traceback with ``--debug`` or ``SDETR_DEBUG=1``) and exits
with ``exit_code``: 2 for a usage error (an option, a config key or value), 1 for a failure (a file that
cannot be used, a download or device that is not there, a run that diverged). Any other exception is a bug
and keeps its traceback. Each class also derives from the built-in exception it refines, so callers that
catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class SparseDetrError(Exception):
    """An error the user can fix; the message is one line."""

    exit_code = 1


class UsageError(SparseDetrError, ValueError):
    """A bad option, configuration key or value."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key or value that is not valid; the message names the key and what to give."""


class DeviceError(UsageError, RuntimeError):
    """A device that this machine does not have (``--device cuda`` without a GPU)."""


class InputError(SparseDetrError, ValueError):
    """A file whose content cannot be used: an annotation file, a checkpoint, a weights file."""


class CheckpointError(InputError):
    """A file that is not a checkpoint, holds objects safe loading refuses, or does not fit the model."""


class MissingFileError(SparseDetrError, FileNotFoundError):
    """A file or folder that is not there."""


class UnavailableError(SparseDetrError, RuntimeError):
    """Something to download that is neither cached nor downloadable; the message says what to pass."""


class NonFiniteError(SparseDetrError, RuntimeError):
    """NaN or infinite values where training needs finite ones (losses, matching costs, gradients, weights)."""


class OutputError(SparseDetrError, OSError):
    """A file or folder that cannot be written."""


class Interrupted(SparseDetrError):
    """Ctrl-C (exit code 130) or SIGTERM (143) stopped a command; the message says what was kept and how to
    go on."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
