"""The ``sdetr`` command line: one module per command group, each command parsing its options and calling
one library function (see :mod:`sparse_detr.cli._app` for the error path and the shared option helpers)."""

from sparse_detr.cli import ablate, benchmark, evaluate, export, resources, train, visualize  # noqa: F401 (register commands)
from sparse_detr.cli._app import app

__all__ = ["app"]
