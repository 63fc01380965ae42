"""Where a sweep stands, read from its run folders without starting anything (``sdetr ablate --status``).

One row per run (variant × seed): its state — ``done`` (its result holds every evaluation it asks for),
``running`` (a process holds its folder's lock: named), ``failed`` (the job that trained it failed: the error
and its log), ``interrupted`` (a checkpoint to resume from, no process on it), ``not started`` — how far its
training got (epoch, batch, optimizer step, from its ``metrics.jsonl``), its last evaluated AP and its folder.
A sweep on a cluster adds what the scheduler knows (:mod:`sparse_detr.cluster.status`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from sparse_detr.ablation.runner import read_failure, read_result, result_complete, result_path, run_train_config
from sparse_detr.ablation.sweep import Sweep
from sparse_detr.checkpoint import CHECKPOINT_NAME
from sparse_detr.utils.lock import lock_holder

STATUS_COLUMNS = ["run", "seed", "state", "job", "epoch", "iteration", "step", "AP", "folder", "detail"]


def _progress(metrics: Path) -> dict[str, float]:
    """The last training position and evaluated AP (%) a ``metrics.jsonl`` records (NaN where none)."""
    progress = dict.fromkeys(("epoch", "iteration", "step", "AP"), math.nan)
    if not metrics.is_file():
        return progress
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line a killed write cut off
            continue
        if not isinstance(row, dict):
            continue
        if "loss" in row:
            progress.update({key: row.get(key, math.nan) for key in ("epoch", "iteration", "step")})
        if isinstance(row.get("eval_AP"), (int, float)):
            progress["AP"] = 100 * row["eval_AP"]
    return progress


def sweep_status(sweep: Sweep) -> pd.DataFrame:
    """One row per run of ``sweep`` (:data:`STATUS_COLUMNS`), in the order the sweep trains them."""
    rows = []
    for run in sweep.runs():
        folder = Path(run_train_config(sweep, run).output_dir)
        result, holder, failure = read_result(result_path(sweep, run)), lock_holder(folder), read_failure(folder)
        if result is not None and result_complete(run, result):
            state, detail = "done", ""
        elif holder is not None:
            state, detail = "running", holder
        elif failure is not None:
            state, detail = "failed", f"{failure.get('error', '')} (log: {failure.get('log') or '-'})"
        elif (folder / CHECKPOINT_NAME).is_file():
            state, detail = "interrupted", "run the sweep again to resume it"
        else:
            state, detail = "not started", ""
        progress = _progress(folder / "metrics.jsonl")
        if result is not None and math.isnan(progress["AP"]):
            progress["AP"] = 100 * result["metrics"]["AP"]
        rows.append({"run": run.name, "seed": run.seed, "state": state, "job": "", **progress,
                     "folder": str(folder), "detail": detail})  # fmt: skip
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)
