"""The ``sdetr`` application, its error path and the option helpers every command shares.

Every command reports the project's own errors (:mod:`sparse_detr.errors`: a bad option, file or setting, a
missing download or device) as one red line and exit code 2 (usage) or 1 (failure); ``--debug`` or
``SDETR_DEBUG=1`` shows their traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from sparse_detr.cli._tables import Column, layout
from sparse_detr.errors import Interrupted, SparseDetrError, UsageError

T = TypeVar("T")

app = typer.Typer(
    help="Sparse DETR and Deformable DETR: train, evaluate, benchmark, ablate and visualize.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Datasets: the built-in synthetic dataset.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
console = Console()
_debug = {"on": False}

CONFIG_OPTION = typer.Option(
    None, "--config", help="TOML config file: [model], [loss], [train], [data] tables (a run's config.toml too)."
)
SET_OPTION = typer.Option(
    None,
    "--set",
    metavar="KEY=VALUE",
    help="A setting over the config, repeatable: model.keep_ratio=0.2, train.lr=1e-4.",
)
LAST_OPTION = typer.Option(
    False, "--last", help="With a run folder: its last checkpoint, not the best (checkpoint_best.pth, by val AP)."
)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="SDETR_DEBUG", help="Show the traceback of errors."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Only results, warnings and errors: no status or progress lines."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also the library's debug lines."),
) -> None:
    _debug["on"] = debug
    warnings.formatwarning = _one_line_warning
    show_library_lines(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record comes (tests replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _PlainFormatter(logging.Formatter):
    """One plain line a record: the message alone at INFO (status and progress read as the command's own
    lines), ``warning:`` / ``error:`` before it above, the logger's name with ``-v``'s debug lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return f"debug: {record.name}: {message}" if record.levelno < logging.INFO else message


def show_library_lines(level: int = logging.INFO) -> None:
    """Show the ``sparse_detr`` logger's lines (status: a kernel build, a dataset being written, where a sweep
    stands; training progress) from ``level`` on, on stderr, so a command's results on stdout stay pipeable;
    under ``torchrun`` rank 0's alone below warnings."""
    logger = logging.getLogger("sparse_detr")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_PlainFormatter())
        logger.addHandler(handler)
    logger.setLevel(level if int(os.environ.get("RANK", 0)) == 0 else max(level, logging.WARNING))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def command(typer_app: typer.Typer, *args, **kwargs):
    """``typer_app.command(...)`` whose function reports :class:`~sparse_detr.errors.SparseDetrError` as one
    red line with its exit code (its traceback with --debug), and Ctrl-C as one line with exit code 130."""

    def register(function):
        @functools.wraps(function)
        def run(*call_args, **call_kwargs):
            try:
                return function(*call_args, **call_kwargs)
            except SparseDetrError as error:
                if _debug["on"]:
                    raise
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=error.exit_code) from None
            except KeyboardInterrupt:  # commands that keep partial work catch it themselves and say what they kept
                if _debug["on"]:
                    raise
                console.print("[red]error:[/red] interrupted", highlight=False)
                raise typer.Exit(code=Interrupted.exit_code) from None

        return typer_app.command(*args, **kwargs)(run)

    return register


def parse_list(text: str | None, kind: Callable[[str], T] = str, option: str = "the option") -> list[T] | None:
    """``"a,b,c"`` -> ``[kind("a"), ...]`` (None stays None); a value ``kind`` refuses is a usage error."""
    if text is None:
        return None
    try:
        return [kind(value.strip()) for value in text.split(",") if value.strip()]
    except ValueError:
        what = "numbers such as 0.1,0.3" if kind in (int, float) else "values"
        raise UsageError(f"{option} expects comma-separated {what}, got {text!r}") from None


def parse_size(size: str) -> tuple[int, int]:
    """``"800x1066"`` -> (800, 1066)."""
    try:
        height, width = (int(value) for value in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"expected HEIGHTxWIDTH such as 800x1066, got {size!r}") from None
    return height, width


def plain(options: dict[str, Any]) -> dict[str, Any]:
    """Option values as configuration values: paths become strings, unset (None) options are left out."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()
            if value is not None}  # fmt: skip


def terminal_width() -> int:
    """The width to print tables at: COLUMNS as it is now (rich reads it once, when the console is made at
    import), else the console's (the terminal's)."""
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else console.width


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence]) -> None:
    """Print ``rows`` (one cell per column) as a table that reads at the terminal's width (see
    :func:`~sparse_detr.cli._tables.layout`: a narrow terminal gets short headers or one block per row)."""
    width = terminal_width()
    for renderable in layout(title, columns, rows, width):
        console.print(renderable, width=width, highlight=False)


def print_frame(frame, title: str, short: dict[str, tuple[str, str]] | None = None, wrap: Sequence[str] = ()) -> None:
    """A pandas frame as a table (NaN: "-", floats with three decimals) that reads at the terminal's width.

    ``short``: column -> (short header, what it means) for narrow terminals; ``wrap``: columns of long text
    (paths, descriptions) that may wrap rather than widen the table.
    """
    short = short or {}
    columns = [Column(str(name), *short.get(name, (None, "")), numeric=frame[name].dtype.kind in "fi",
                      wrap=name in wrap) for name in frame.columns]  # fmt: skip
    rows = [["-" if value != value else f"{value:.3f}" if isinstance(value, float) else str(value) for value in row]
            for row in frame.itertuples(index=False)]  # fmt: skip
    print_table(title, columns, rows)


def log_line(text: str) -> None:
    """Print ``text`` as it is (run names and TOML tables hold brackets that rich would read as markup)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)
