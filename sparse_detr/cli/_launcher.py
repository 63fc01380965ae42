"""The scheduler options ``sdetr train`` and ``sdetr ablate`` share (``--launcher slurm`` and what its jobs ask
for), declared once, and how they become :class:`~sparse_detr.config.launcher.LauncherSettings`."""

from __future__ import annotations

from typing import Any

import typer

from sparse_detr.config.launcher import LAUNCHERS, parse_slurm_options
from sparse_detr.errors import UsageError

LAUNCHER_OPTION = typer.Option(
    None, "--launcher", help=f"Where to train: {' or '.join(LAUNCHERS)} (local: this process, the default)."
)
PARTITION_OPTION = typer.Option(None, "--partition", help="Slurm partition (default: the cluster's default).")
ACCOUNT_OPTION = typer.Option(None, "--account", help="Slurm account to charge.")
QOS_OPTION = typer.Option(None, "--qos", help="Slurm quality of service.")
TIME_OPTION = typer.Option(
    None, "--time", help="Slurm time limit of each job (90, 4:00:00, 2-00:00:00); it requeues itself at the limit."
)
CPUS_OPTION = typer.Option(
    None, "--cpus-per-task", min=1, help="CPUs per process (default: its data loading workers + 1)."
)
MEM_OPTION = typer.Option(None, "--mem", help="Memory per node, such as 64G.")
SLURM_OPTION = typer.Option(
    None,
    "--slurm",
    metavar="KEY=VALUE",
    help="Any other sbatch option, repeatable: --slurm constraint=a100, --slurm exclusive.",
)
WAIT_OPTION = typer.Option(False, "--wait", help="With --launcher slurm: block until the jobs end.")
# the parameters the options above fill, which are not configuration fields
LAUNCHER_PARAMETERS = ("launcher", "partition", "account", "qos", "time", "cpus_per_task", "mem", "slurm", "wait")


def launcher_changes(
    launcher: str | None,
    partition: str | None,
    account: str | None,
    qos: str | None,
    time: str | None,
    cpus_per_task: int | None,
    mem: str | None,
    slurm: list[str] | None,
    **resources: int | None,
) -> dict[str, Any]:
    """The options given, as :class:`~sparse_detr.config.launcher.LauncherSettings` fields (unset ones left
    out); ``resources``: ``nodes``, ``gpus_per_node``, ``processes_per_node``, ``max_parallel``."""
    changes = {"launcher": launcher, "partition": partition, "account": account, "qos": qos, "time": time,
               "cpus_per_task": cpus_per_task, "mem": mem, **resources}  # fmt: skip
    if slurm:
        changes["slurm"] = parse_slurm_options(slurm)
    return {key: value for key, value in changes.items() if value is not None}


def refuse_without_slurm(launcher: str, launch: dict[str, Any]) -> None:
    """A scheduler option with the local launcher would be silently ignored: say so instead."""
    given = [key for key in launch if key != "launcher"]
    if launcher != "slurm" and given:
        option = "--" + given[0].replace("_", "-")
        raise UsageError(f"{option} is a Slurm job setting: add --launcher slurm (or leave {option} out)")
