"""Where training runs: in this process (``local``) or as Slurm jobs (``slurm``), and what each job asks for.

One :class:`LauncherSettings` holds every scheduler setting ``sdetr train`` and ``sdetr ablate`` take, from
options or an experiment file's ``[launcher]`` table; :mod:`sparse_detr.cluster` turns it into submitit's
parameters. A run's resources: ``nodes`` nodes, each with ``gpus_per_node`` GPUs and one process per GPU, or
on CPU-only nodes ``processes_per_node`` processes (gloo). ``slurm`` holds any other ``sbatch`` option
(``--slurm constraint=a100`` becomes ``#SBATCH --constraint=a100``, ``--slurm exclusive`` ``#SBATCH --exclusive``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from sparse_detr.config.fields import at_least, check_field, declare_ranges, field_names, one_of
from sparse_detr.errors import ConfigError

LAUNCHERS = ("local", "slurm")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")  # Slurm's forms: M, M:S, H:M:S, D-H, D-H:M:S
_SLURM_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
# options with their own setting here: --slurm may not set them a second time
_OWN_KEYS = {
    "partition", "account", "qos", "time", "cpus_per_task", "mem", "nodes", "ntasks_per_node", "gres", "gpus",
    "gpus_per_node", "array", "job_name", "output", "error", "signal", "dependency",
}  # fmt: skip


@dataclass(frozen=True)
class LauncherSettings:
    """How runs are started (see the module docstring). ``time`` is Slurm's time limit (``90``, ``4:00:00``,
    ``2-00:00:00``); ``mem`` the memory per node (``32G``); ``max_parallel`` the most array tasks running at
    once (0: no limit); ``signal_seconds`` how long before the time limit a job is told to checkpoint and
    requeue itself."""

    launcher: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int | None = None
    mem: str | None = None
    max_parallel: int = 0
    nodes: int = 1
    gpus_per_node: int = 0
    processes_per_node: int = 1
    signal_seconds: int = 120
    slurm: dict[str, str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in field_names(LauncherSettings):
            if name != "slurm":
                object.__setattr__(self, name, check_field(LauncherSettings, name, getattr(self, name)))
        time_limit_minutes(self.time)
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise ConfigError(f"mem must be Slurm's memory per node, such as 32G or 64000 (MiB), got {self.mem!r}")
        object.__setattr__(self, "slurm", dict(check_slurm_options(self.slurm)))

    @property
    def processes_per_run(self) -> int:
        """The processes that train one run: one per GPU, or ``processes_per_node`` per CPU-only node."""
        return self.nodes * (self.gpus_per_node or self.processes_per_node)


declare_ranges(
    LauncherSettings,
    {"launcher": one_of(LAUNCHERS), "cpus_per_task": at_least(1), "max_parallel": at_least(0),
     "nodes": at_least(1), "gpus_per_node": at_least(0), "processes_per_node": at_least(1),
     "signal_seconds": at_least(0)},
)  # fmt: skip


def time_limit_minutes(text: str) -> int:
    """Slurm's time limit ``text`` in whole minutes (at least 1).

    Raises:
        ConfigError: not one of Slurm's forms.
    """
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"time must be Slurm's time limit, such as 90, 4:00:00 or 2-00:00:00, got {text!r}")
    days, first, second, third = (int(group) if group else None for group in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        minutes = days * 1440 + first * 60 + (second or 0) + (third or 0) / 60
    elif third is not None:  # H:M:S
        minutes = first * 60 + second + third / 60
    else:  # M or M:S
        minutes = first + (second or 0) / 60
    return max(1, round(minutes))


def check_slurm_options(options: dict[str, Any]) -> dict[str, str | bool]:
    """``options`` (``sbatch`` option names without ``--``, ``-`` or ``_``) with string values, or True for a
    flag (``exclusive``, ``hold``); False leaves an option out.

    Raises:
        ConfigError: a name that is no option name, a value that is not a string, number or boolean, or an
            option this tool sets from its own setting (named).
    """
    checked: dict[str, str | bool] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if not _SLURM_KEY.fullmatch(key):
            raise ConfigError(f"--slurm {key}=...: {key!r} is not an sbatch option name (such as constraint)")
        if name in _OWN_KEYS:
            own = {"ntasks_per_node": "--gpus-per-node", "gres": "--gpus-per-node", "gpus": "--gpus-per-node"}
            raise ConfigError(f"--slurm {key}: set it with {own.get(name, '--' + name.replace('_', '-'))} instead")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"--slurm {key} must be a string, a number or true (a flag), got {value!r}")
        if value is not False:
            checked[name] = True if value is True else str(value)
    return checked


def parse_slurm_options(items: list[str] | tuple[str, ...]) -> dict[str, str | bool]:
    """Repeated ``--slurm key=value`` (or ``--slurm flag``) options as a dict (checked by
    :func:`check_slurm_options`)."""
    options: dict[str, str | bool] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"--slurm takes key=value (an sbatch option and its value) or a flag, got {item!r}")
        options[key.strip()] = value.strip() if equals else True
    return check_slurm_options(options)


def launcher_from_dict(table: dict[str, Any], source: str = "[launcher]") -> LauncherSettings:
    """A ``[launcher]`` table as :class:`LauncherSettings`; errors name ``source`` and the key."""
    known = field_names(LauncherSettings)
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key {source} {key!r}; known: {', '.join(known)}")
    if "slurm" in table and not isinstance(table["slurm"], dict):
        raise ConfigError(f"{source} slurm must be a table of sbatch options, got {table['slurm']!r}")
    try:
        return LauncherSettings(**table)
    except ConfigError as error:
        raise ConfigError(f"{source} {error}") from None


def launcher_to_dict(settings: LauncherSettings) -> dict[str, Any]:
    """The ``[launcher]`` table of ``settings`` (unset fields left out)."""
    return {key: value for key, value in dataclasses.asdict(settings).items() if value is not None and value != {}}


def with_launcher_changes(settings: LauncherSettings, **changes: Any) -> LauncherSettings:
    """``settings`` with the given fields replaced (None: unchanged; ``slurm`` options are added to its own)."""
    changes = {key: value for key, value in changes.items() if value is not None}
    if "slurm" in changes:
        changes["slurm"] = {**settings.slurm, **changes["slurm"]}
    return dataclasses.replace(settings, **changes)
