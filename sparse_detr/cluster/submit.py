"""Submitting work to Slurm with submitit: a sweep as one job array (one task per run) and a report job after
it, or one training over several nodes.

A sweep's submitit files (pickled tasks, each task's stdout and stderr) go to ``<runs_dir>/.submitit/``, with
``jobs.json`` there recording which job trains which run. Submitting a sweep again skips finished runs and
runs that a queued or running job (or a process on this machine) holds, and retries failed ones: no two jobs
ever write one run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from sparse_detr.ablation.runner import (
    check_same_settings,
    read_result,
    result_complete,
    result_path,
    run_settings,
    run_train_config,
)
from sparse_detr.ablation.sweep import Run, Sweep
from sparse_detr.cluster.scheduler import QUEUED_STATES, RUNNING_STATES, ClusterError, check_cluster, job_states
from sparse_detr.cluster.tasks import SweepReportTask, SweepRunTask, TrainingTask
from sparse_detr.config.launcher import LauncherSettings, time_limit_minutes
from sparse_detr.engine.distributed import share_batch
from sparse_detr.engine.run_config import RunConfig
from sparse_detr.engine.run_folder import clear_run
from sparse_detr.utils.io import atomic_write_text
from sparse_detr.utils.lock import folder_lock, lock_holder

logger = logging.getLogger(__name__)

SUBMITIT_FOLDER = ".submitit"
JOBS_FILE = "jobs.json"
MAX_REQUEUES = 50  # time-limit requeues of one job (submitit's default, 3, ends a 50-epoch run too soon)


@dataclass(frozen=True)
class Submission:
    """What a submission did: the array job (``job_id``; None when there was nothing to submit) and its tasks'
    ids by run, the report job, and the runs it left out, by why (``done``, ``queued``, ``running``)."""

    job_id: str | None = None
    task_ids: dict[str, str] = field(default_factory=dict)
    report_job_id: str | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    jobs: list[Any] = field(default_factory=list, repr=False)  # submitit's Job objects (for waiting)

    @property
    def submitted(self) -> list[str]:
        return list(self.task_ids)


def submitit_folder(sweep: Sweep) -> Path:
    return sweep.run_root / SUBMITIT_FOLDER


def executor(
    folder: Path, settings: LauncherSettings, name: str, workers: int = 0, cluster: str = "slurm"
) -> submitit.AutoExecutor:
    """submitit's executor for jobs of ``settings``' resources (every option passed on to ``sbatch``); each
    process gets ``cpus_per_task`` CPUs, by default one more than its ``workers`` data-loading processes.
    ``cluster="local"``: submitit's local executor, the same tasks as processes of this machine (tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, slurm_max_num_timeout=MAX_REQUEUES)
    tasks = settings.gpus_per_node or settings.processes_per_node
    parameters: dict[str, Any] = {
        "name": name,
        "timeout_min": time_limit_minutes(settings.time),
        "nodes": settings.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": settings.cpus_per_task or workers + 1,
    }
    if settings.gpus_per_node:
        parameters["gpus_per_node"] = settings.gpus_per_node
    if cluster == "slurm":
        slurm = {"partition": settings.partition, "account": settings.account, "qos": settings.qos,
                 "mem": settings.mem}  # fmt: skip
        parameters.update({f"slurm_{key}": value for key, value in slurm.items() if value is not None})
        parameters["slurm_signal_delay_s"] = settings.signal_seconds
        if settings.max_parallel:
            parameters["slurm_array_parallelism"] = settings.max_parallel
        if settings.slurm:
            parameters["slurm_additional_parameters"] = dict(settings.slurm)
    made.update_parameters(**parameters)
    return made


def anchored(sweep: Sweep) -> Sweep:
    """``sweep`` with its folders and data as absolute paths: a job may start in another folder."""
    paths = {"output": sweep.report_dir, "runs_dir": sweep.run_root}
    for key in ("data", "train_images", "train_ann", "val_images", "val_ann"):
        if getattr(sweep, key) is not None:
            paths[key] = Path(getattr(sweep, key))
    return dataclasses.replace(sweep, **{key: str(path.absolute()) for key, path in paths.items()})


def read_jobs(sweep: Sweep) -> dict[str, Any]:
    """The sweep's job record: ``{"cluster": "slurm" or "local", "runs": {run folder: job id}, "reports": [job
    ids]}`` (a record without ``cluster`` was written by Slurm submissions)."""
    path = submitit_folder(sweep) / JOBS_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    return {"cluster": record.get("cluster", "slurm"), "runs": dict(record.get("runs", {})),
            "reports": list(record.get("reports", []))}  # fmt: skip


def _write_jobs(sweep: Sweep, record: dict[str, Any]) -> None:
    atomic_write_text(submitit_folder(sweep) / JOBS_FILE, json.dumps(record, indent=2))


def active_jobs(sweep: Sweep, record: dict[str, Any] | None = None) -> dict[str, str]:
    """The run folders a queued or running job holds, with that job's state (Slurm's word)."""
    record = read_jobs(sweep) if record is None else record
    if not record["runs"] or record["cluster"] != "slurm":  # local job ids are process ids, not Slurm's
        return {}
    states = job_states(sorted({job.partition("_")[0] for job in record["runs"].values()}))
    return {
        folder: states[job]
        for folder, job in record["runs"].items()
        if states.get(job) in QUEUED_STATES | RUNNING_STATES
    }


def submit_sweep(sweep: Sweep, cluster: str = "slurm") -> Submission:
    """Submit ``sweep``'s unfinished runs as one job array with ``sweep.launcher``'s resources, and a job that
    rebuilds the report after it (``afterany``). Runs that are finished, held by a queued or running job, or
    trained by a process on this machine are left out.

    Raises:
        ClusterError: no Slurm, an unknown partition, GPUs a partition lacks, or ``sbatch`` refused the job.
        ConfigError: a run's batch cannot be shared by its processes.
    """
    settings = sweep.launcher
    if cluster == "slurm":
        check_cluster(settings)
    sweep = anchored(sweep)
    runs = sweep.runs()
    share_batch(run_train_config(sweep, runs[0]), settings.processes_per_run)  # refused before any submission
    with folder_lock(submitit_folder(sweep), "sweep submission"):  # two at once: the second stops with one line
        return _submit_runs(sweep, runs, cluster)


def _submit_runs(sweep: Sweep, runs: list[Run], cluster: str) -> Submission:
    settings = sweep.launcher
    record = read_jobs(sweep)
    if record["cluster"] != cluster:  # job ids of another cluster mean nothing to this one
        record = {"cluster": cluster, "runs": {}, "reports": []}
    active = active_jobs(sweep, record)
    skipped: dict[str, list[str]] = {}
    to_submit: list[Run] = []
    for run in runs:
        stored = read_result(result_path(sweep, run))
        if stored is not None:
            check_same_settings(stored, run_settings(sweep, run), result_path(sweep, run))
        if stored is not None and result_complete(run, stored):
            skipped.setdefault("done", []).append(run.folder)
        elif run.folder in active:
            state = "running" if active[run.folder] in RUNNING_STATES else "queued"
            skipped.setdefault(state, []).append(run.folder)
        elif lock_holder(sweep.run_root / run.folder) is not None:
            skipped.setdefault("running", []).append(run.folder)
        else:
            to_submit.append(run)
    if not to_submit:
        return Submission(skipped=skipped)
    workers = run_train_config(sweep, runs[0]).workers
    runs_executor = executor(submitit_folder(sweep), settings, f"sdetr-{sweep.name}", workers, cluster)
    jobs = _submitted(runs_executor, [SweepRunTask(sweep, run) for run in to_submit])
    task_ids = {run.folder: job.job_id for run, job in zip(to_submit, jobs)}
    array_id = jobs[0].job_id.partition("_")[0]
    report_job = None
    if cluster == "slurm":
        report_settings = dataclasses.replace(settings, nodes=1, gpus_per_node=0, processes_per_node=1, slurm={})
        report_executor = executor(submitit_folder(sweep), report_settings, f"sdetr-{sweep.name}-report", 0, cluster)
        report_executor.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{array_id}"})
        report_job = _submitted(report_executor, [SweepReportTask(sweep)])[0]
    record["runs"].update(task_ids)
    if report_job is not None:
        record["reports"].append(report_job.job_id)
    _write_jobs(sweep, record)
    return Submission(array_id, task_ids, report_job.job_id if report_job else None, skipped,
                      [*jobs, *([report_job] if report_job else [])])  # fmt: skip


def submit_training(
    run_config: RunConfig, settings: LauncherSettings, replace: bool = False, cluster: str = "slurm"
) -> Any:
    """Submit one training of ``run_config`` over ``settings``' nodes and processes (its batch per process, as
    under ``torchrun``); submitit's files go to ``<run folder>/.submitit/``. ``replace`` starts a new run in the
    folder (``--force``: the files of the run it holds are removed). Returns submitit's job.

    Raises:
        ClusterError: as :func:`submit_sweep`, or a queued or running job already trains in the run folder.
    """
    if cluster == "slurm":
        check_cluster(settings)
    folder = Path(run_config.train.output_dir).absolute()
    run_config = dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, output_dir=str(folder)))
    record_path = folder / SUBMITIT_FOLDER / JOBS_FILE
    with folder_lock(folder / SUBMITIT_FOLDER, "training submission"):
        earlier = json.loads(record_path.read_text()).get("job") if record_path.is_file() else None
        state = job_states([earlier]).get(earlier) if earlier and cluster == "slurm" else None
        if state in QUEUED_STATES | RUNNING_STATES:
            raise ClusterError(f"job {earlier} ({state.lower()}) already trains in {folder}: wait for it "
                               f"(squeue --me), or scancel {earlier} first")  # fmt: skip
        if replace:
            clear_run(folder)
        made = executor(folder / SUBMITIT_FOLDER, settings, f"sdetr-train-{folder.name}", run_config.train.workers,
                        cluster)  # fmt: skip
        job = _submitted(made, [TrainingTask(run_config)])[0]
        atomic_write_text(record_path, json.dumps({"job": job.job_id}))
    return job


def _submitted(made: submitit.AutoExecutor, tasks: list[Any]) -> list[Any]:
    """``tasks`` submitted as one job (an array when several); sbatch's refusal as one line."""
    try:
        if len(tasks) == 1:
            return [made.submit(tasks[0])]
        with made.batch():
            jobs = [made.submit(task) for task in tasks]
        return jobs
    except submitit.core.utils.FailedJobError as error:
        lines = [line for line in str(error).splitlines() if "error" in line.lower()] or str(error).splitlines()
        raise ClusterError(f"Slurm refused the job: {lines[-1].strip() if lines else error}") from None


def wait(jobs: list[Any], poll_s: float = 5.0) -> None:
    """Block until every one of submitit's ``jobs`` has left Slurm's queue (or, on submitit's local executor,
    ended)."""
    slurm_ids = [job.job_id for job in jobs if isinstance(job, submitit.SlurmJob)]
    for job in jobs:
        if not isinstance(job, submitit.SlurmJob):
            job.wait()
    while slurm_ids:
        states = job_states(sorted({job.partition("_")[0] for job in slurm_ids}))
        if not any(state in QUEUED_STATES | RUNNING_STATES for state in states.values()):
            return
        time.sleep(poll_s)
