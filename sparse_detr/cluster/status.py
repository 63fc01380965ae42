"""Where a sweep on a cluster stands: the run folders' view (:func:`~sparse_detr.ablation.status.sweep_status`)
with what Slurm knows of the jobs that train them (``squeue``, ``sacct`` where accounting is kept): ``queued``
and ``running`` runs with their job and array task, ``failed`` ones with Slurm's word (or, where Slurm keeps
no accounting, a job that ended without the run's result), ``not submitted`` for runs no job has held yet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_detr.ablation.status import sweep_status
from sparse_detr.ablation.sweep import Sweep
from sparse_detr.cluster.scheduler import FAILED_STATES, QUEUED_STATES, RUNNING_STATES, job_states
from sparse_detr.cluster.submit import read_jobs
from sparse_detr.cluster.tasks import RUN_LOG


def cluster_sweep_status(sweep: Sweep) -> pd.DataFrame:
    """:func:`~sparse_detr.ablation.status.sweep_status` with each run's latest job (``123_4``) and the
    scheduler's state where it says more than the run folder does."""
    table = sweep_status(sweep)
    record = read_jobs(sweep)
    jobs = record["runs"]
    on_slurm = jobs and record["cluster"] == "slurm"  # local job ids are process ids, not Slurm's
    states = job_states(sorted({job.partition("_")[0] for job in jobs.values()})) if on_slurm else {}
    for index, folder in zip(table.index, sweep.runs()):
        job = jobs.get(folder.folder)
        if job is None:
            if table.at[index, "state"] == "not started":
                table.at[index, "state"] = "not submitted"
            continue
        table.at[index, "job"] = job
        state = states.get(job, "")
        if table.at[index, "state"] == "done":
            continue
        if state in QUEUED_STATES:
            table.at[index, "state"], table.at[index, "detail"] = "queued", state.lower()
        elif state in RUNNING_STATES and table.at[index, "state"] != "running":  # not yet (or no longer) locked
            table.at[index, "state"], table.at[index, "detail"] = "running", state.lower()
        elif state in FAILED_STATES and table.at[index, "state"] != "failed":
            table.at[index, "state"], table.at[index, "detail"] = "failed", f"Slurm: {state.lower()}"
        elif not state and table.at[index, "state"] in ("interrupted", "not started"):  # killed outright
            log = Path(table.at[index, "folder"]) / RUN_LOG
            table.at[index, "state"] = "failed"
            table.at[index, "detail"] = f"job {job} ended before the run finished (log: {log})"
    return table
