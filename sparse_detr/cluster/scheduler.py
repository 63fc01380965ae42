"""What Slurm itself says, through its command-line tools: whether it is there, its partitions and their GPUs,
and the state of submitted jobs (``squeue``, then ``sacct`` where accounting is kept).

Every question is one command with a timeout; a missing tool or a controller that does not answer is a
:class:`ClusterError` naming the command, never a traceback.
"""

from __future__ import annotations

import shutil
import subprocess

from sparse_detr.config.launcher import LauncherSettings
from sparse_detr.errors import SparseDetrError

_TIMEOUT_S = 30
# squeue's and sacct's job states, in the words --status uses
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}
FAILED_STATES = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "CANCELLED", "PREEMPTED"}


class ClusterError(SparseDetrError):
    """Slurm is missing, does not answer, or refused a job; the message says which and what to do."""

    exit_code = 2


def slurm_command(arguments: list[str]) -> str:
    """The output of a Slurm tool (``sinfo``, ``squeue``, ...).

    Raises:
        ClusterError: the tool is not installed, times out, or fails (its first error line quoted).
    """
    tool = arguments[0]
    if shutil.which(tool) is None:
        raise ClusterError(
            f"--launcher slurm needs Slurm's {tool}, and there is none on this machine: run on the cluster's "
            "login node, or start a local one-node cluster with scripts/local_slurm.sh start"
        )
    try:
        done = subprocess.run(arguments, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(arguments)} did not answer within {_TIMEOUT_S} s: is slurmctld up?") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[0]
        raise ClusterError(f"{' '.join(arguments)} failed: {message}")
    return done.stdout


def partitions() -> dict[str, str]:
    """Each partition's name and generic resources (``gpu:8`` or ``(null)``); the default one first."""
    found: dict[str, str] = {}
    default = None
    for line in slurm_command(["sinfo", "--noheader", "--format=%P|%G"]).splitlines():
        name, _, gres = line.strip().partition("|")
        if not name:
            continue
        if name.endswith("*"):
            name = default = name[:-1]
        found[name] = " ".join(item for item in (found.get(name), gres) if item and item != "(null)") or "(null)"
    return dict(sorted(found.items(), key=lambda item: item[0] != default))


def check_cluster(settings: LauncherSettings) -> None:
    """Refuse, before anything is submitted, what the cluster cannot run: no Slurm, an unknown partition,
    GPUs asked of a partition that has none.

    Raises:
        ClusterError: one line naming the option and what to change.
    """
    slurm_command(["sbatch", "--version"])
    known = partitions()
    if not known:
        raise ClusterError("sinfo lists no partition: is the cluster up (scripts/local_slurm.sh status)?")
    name = settings.partition or next(iter(known))
    if name not in known:
        raise ClusterError(f"--partition {name}: no such partition; partitions here: {', '.join(known)}")
    if settings.gpus_per_node and "gpu" not in known[name]:
        raise ClusterError(
            f"GPUs asked for (--gpus-per-node/--gpus-per-run), but partition {name} has none (sinfo shows no gpu "
            "resources): leave them out to train on CPUs (--processes-per-node for several processes), or choose "
            "a GPU partition with --partition"
        )


def job_states(job_ids: list[str]) -> dict[str, str]:
    """The state of each job (and array task, as ``123_4``) among ``job_ids`` that Slurm still knows: squeue's
    for queued and running jobs, then sacct's for ended ones where accounting is kept. Jobs neither knows are
    left out."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    wanted = set(job_ids)
    # all of the user's jobs: squeue --jobs fails outright on a job it has forgotten
    for line in slurm_command(["squeue", "--noheader", "--array", "--me", "--format=%i|%T"]).splitlines():
        job, _, state = line.strip().partition("|")
        if job in wanted or job.partition("_")[0] in wanted:
            states[job] = state
    try:
        ended = slurm_command(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}",
                               "--format=JobID,State"])  # fmt: skip
    except ClusterError:  # no accounting on this cluster: squeue alone
        return states
    for line in ended.splitlines():  # (without accounting, sacct says so in a line without "|")
        job, bar, state = line.strip().partition("|")
        if bar and job not in states:
            states[job] = state.split()[0] if state else ""
    return states


def squeue_known(job_ids: list[str]) -> bool:
    """Whether any of ``job_ids`` is still queued or running."""
    return any(state in QUEUED_STATES | RUNNING_STATES for state in job_states(job_ids).values())
