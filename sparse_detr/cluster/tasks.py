"""What a Slurm job runs (through submitit): one run of a sweep, the sweep's report, or one long training.

Every process of a job calls the same task. :func:`join_job` turns the job's tasks into a torch process group
(submitit's ``TorchDistributedEnvironment``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... as ``torchrun`` sets
them). Interruptions lose nothing:

- Slurm's warning before the time limit (SIGUSR2, ``--signal``) stops the training after its current step
  with a checkpoint; rank 0 then hands the signal to submitit, which requeues the job with the same task
  (:class:`~submitit.helpers.Checkpointable`), and the requeued job resumes from that checkpoint;
- preemption and ``scontrol requeue`` (SIGTERM) stop the training the same way, and Slurm starts the job again.

A run that fails for another reason is marked failed in its folder (with its log), and the sweep's other runs
go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import submitit
import torch

from sparse_detr.ablation.runner import mark_failed, run_alone, write_sweep_report
from sparse_detr.ablation.sweep import Run, Sweep
from sparse_detr.engine.run_config import RunConfig
from sparse_detr.engine.trainer import train_run
from sparse_detr.errors import Interrupted

logger = logging.getLogger(__name__)
RUN_LOG = "job.log"  # in a run folder: what the jobs that trained it logged (rank 0), requeues appended
_TIME_LIMIT_EXIT = 128 + getattr(signal, "SIGUSR2", 12)  # Interrupted.exit_code after Slurm's time-limit warning


def join_job() -> submitit.JobEnvironment:
    """Set this process up as one of its job's processes: the process group's variables (when the job has
    several tasks), CPU threads to the CPUs Slurm gave the task, and the library's lines on stderr (submitit's
    log files)."""
    job = submitit.JobEnvironment()
    if job.num_tasks > 1:  # each task sees the node's GPUs; LOCAL_RANK picks one (engine.distributed)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        torch.set_num_threads(int(cpus))
    library = logging.getLogger("sparse_detr")
    if not library.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        library.addHandler(handler)
    library.setLevel(logging.INFO if job.global_rank == 0 else logging.WARNING)
    return job


@contextlib.contextmanager
def _logged_to(folder: Path) -> Iterator[None]:
    """The library's lines also appended to ``folder/job.log`` (rank 0; the folder is made if need be)."""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / RUN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    library = logging.getLogger("sparse_detr")
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)
        handler.close()


class _RequeuingTask(submitit.helpers.Checkpointable):
    """A task that logs to its run folder and, stopped by Slurm's time-limit warning, requeues itself once its
    training has saved."""

    def __call__(self) -> Any:
        job = join_job()
        with _logged_to(self.folder()):
            try:
                return self.work(job)
            except Interrupted as stop:
                if stop.exit_code == _TIME_LIMIT_EXIT:
                    logger.info(f"job {job.job_id}: the time limit is near; the checkpoint is saved, requeuing")
                    signal.raise_signal(signal.SIGUSR2)  # submitit's handler: this task again, requeued (rank 0)
                raise

    def folder(self) -> Path:
        """The run folder the task trains in (its ``job.log``)."""
        raise NotImplementedError

    def work(self, job: submitit.JobEnvironment) -> Any:
        raise NotImplementedError


class SweepRunTask(_RequeuingTask):
    """One run of a sweep, trained by all the processes of its array task and measured by rank 0 (see
    :func:`~sparse_detr.ablation.runner.run_alone`); then the sweep's report is rebuilt from what is finished."""

    def __init__(self, sweep: Sweep, run: Run):
        self.sweep, self.run = sweep, run

    def folder(self) -> Path:
        return self.sweep.run_root / self.run.folder

    def work(self, job: submitit.JobEnvironment) -> str:
        logger.info(f"job {job.job_id}: run {self.run.label} of sweep {self.sweep.name}, {job.num_tasks} process(es)")
        try:
            result = run_alone(self.sweep, self.run)
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as error:
            if job.global_rank == 0:
                mark_failed(self.folder(), f"{type(error).__name__}: {error}", str(self.folder() / RUN_LOG), job.job_id)
                logger.error(f"run {self.run.label} failed: {error}")
            raise
        if result is None:  # not rank 0
            return ""
        write_sweep_report(self.sweep)
        return f"{self.run.label}: AP {result['metrics']['AP']:.4f}"


class SweepReportTask(submitit.helpers.Checkpointable):
    """The sweep's report rebuilt from every finished run (the job that runs after all of the sweep's tasks)."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    def __call__(self) -> str:
        join_job()
        report = write_sweep_report(self.sweep)
        return f"report of {len(report.table) if report is not None else 0} variants in {self.sweep.report_dir}"


class TrainingTask(_RequeuingTask):
    """One training (``sdetr train --launcher slurm``) over all the job's processes, resumed after a requeue
    from the run folder's checkpoint."""

    def __init__(self, run_config: RunConfig):
        self.run_config = run_config

    def folder(self) -> Path:
        return Path(self.run_config.train.output_dir)

    def work(self, job: submitit.JobEnvironment) -> dict[str, float]:
        logger.info(f"job {job.job_id}: training in {self.folder()}, {job.num_tasks} process(es)")
        return train_run(self.run_config)
