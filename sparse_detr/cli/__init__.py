"""The ``sdetr`` command line: one module per command group, each command parsing its options and calling
one library function (see :mod:`sparse_detr.cli._app` for the error path and the shared option helpers).

:func:`main` is the ``sdetr`` executable: the application with every option also read from the environment
as ``SDETR_<COMMAND>_<OPTION>`` (``SDETR_TRAIN_EPOCHS=1``, ``SDETR_DATA_SYNTH_OUT=...``), for clusters and
scripts that cannot change a command's text (all but ``--force``).
"""

import typer

from sparse_detr.cli import ablate, benchmark, evaluate, export, resources, train, visualize  # noqa: F401 (register commands)
from sparse_detr.cli._app import app

__all__ = ["app", "environment_variable", "main"]

ENV_PREFIX = "SDETR"
_TYPED_ONLY = ("help", "force")  # options never read from the environment


def environment_variable(command_path: list[str], option) -> str:
    """``SDETR_TRAIN_ITERS_PER_EPOCH`` for ``sdetr train --iters-per-epoch``: the command path and the
    option's first long name (the one ``--help`` shows), upper case."""
    name = next((text for text in option.opts if text.startswith("--")), option.opts[0]).lstrip("-")
    return "_".join([ENV_PREFIX, *command_path, name]).upper().replace("-", "_")


def _read_environment(command, path: list[str]) -> None:
    """Give every option without an environment variable of its own the one :func:`environment_variable`
    names, in ``command`` and its subcommands; not ``--force``, which deletes work and so is only typed."""
    for parameter in command.params:
        # typer carries its own click, so options are told by their kind rather than by class
        if parameter.param_type_name == "option" and parameter.envvar is None and parameter.name not in _TYPED_ONLY:
            parameter.envvar = environment_variable(path, parameter)
    for name, subcommand in getattr(command, "commands", {}).items():
        _read_environment(subcommand, [*path, name])


def build_command():
    """The ``sdetr`` click command, its options readable from the environment."""
    command = typer.main.get_command(app)
    _read_environment(command, [])
    return command


def main() -> None:
    """The ``sdetr`` executable."""
    build_command()(prog_name="sdetr")
