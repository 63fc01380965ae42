"""What a sweep will do, said before it starts, and how long it will take, said as soon as it can be measured.

:func:`describe_plan` lists the runs, which variants the user asked for and which come from the experiment
file or the built-in default (with the option that drops each), and what is already finished.
:class:`TimeEstimate` turns the measured time of the first epoch, then of each finished run, into the time
left, so the first estimate comes minutes into the sweep rather than after a whole run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection

from sparse_detr.ablation.sweep import Run, Sweep
from sparse_detr.config import train_recipe
from sparse_detr.utils.progress import format_estimate

_DROP_OPTIONS = {"baseline": "--no-baseline", "random": "--no-random"}


def _kind(run: Run) -> str:
    """``baseline``, ``noaux`` (without the encoder aux loss), ``random`` or ``sparse``."""
    if run.ranking == "baseline":
        return "baseline"
    if not run.enc_aux_loss:
        return "noaux"
    return "random" if run.ranking == "random" else "sparse"


def _asked_for(sweep: Sweep, run: Run, asked: Collection[str]) -> bool:
    """Whether the options the user gave (``asked``: sweep field names) make ``run``."""
    kind = _kind(run)
    if kind == "sparse" or (kind == "random" and "random" in sweep.rankings):  # --criterion random names it too
        return bool({"rankings", "keep_ratios"} & set(asked))
    return {"baseline": "baseline", "noaux": "no_enc_aux", "random": "random"}[kind] in asked


def describe_plan(sweep: Sweep, source: str, asked: Collection[str], runs: list[Run], finished: int) -> list[str]:
    """Lines that say what the sweep trains: ``runs`` (this process's share of ``sweep.runs()``), of which
    ``finished`` are done, the variants the user ``asked`` for (sweep field names given as options) and those
    that come from ``source`` (the experiment file or the built-in default), each with how to drop it."""
    variants, seeds = sweep.variants(), sweep.run_seeds
    epochs = sweep.train.get("epochs") or _recipe_epochs(sweep)
    lines = [
        f"plan: {len(runs)} runs = {len(variants)} variants x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
        f"({', '.join(map(str, seeds))}), {epochs} epochs each, {sweep.preset} on {sweep.data_source.describe()}",
    ]
    mine = [run.name for run in variants if _asked_for(sweep, run, asked)]
    inherited = [run for run in variants if run.name not in mine]
    if mine and inherited:
        lines.append(f"  asked for: {', '.join(mine)}")
    if inherited:
        groups: dict[str, list[str]] = {}
        for run in inherited:
            groups.setdefault(_kind(run), []).append(run.name)
        described = [
            f"{', '.join(names)}" + (f" ({_DROP_OPTIONS[kind]} drops it)" if kind in _DROP_OPTIONS else "")
            for kind, names in groups.items()
        ]
        lines.append(f"  from {source}: {'; '.join(described)}")
    extras = []
    if len(seeds) > 1 and "seeds" not in asked and "seed_count" not in asked:
        extras.append(f"{len(seeds)} seeds (--seeds 1 trains one)")
    if sweep.eval_keep_ratios and not set(asked) & {"eval_keep_ratios", "eval_train_keep_ratio"}:
        model = next(run.name for run in variants if run.eval_keep_ratios)
        ratios = ", ".join(f"{value:g}" for value in sweep.eval_keep_ratios)
        extras.append(f"{model} also evaluated at rho {ratios} (--eval-rho none drops it)")
    if extras:
        lines.append(f"  {'also ' if inherited else ''}from {source}: {'; '.join(extras)}")
    if finished:
        lines.append(f"  already finished: {finished} of {len(runs)} (kept; the others train now)")
    return lines


def _recipe_epochs(sweep: Sweep) -> int:
    return train_recipe(sweep.preset, **sweep.train).epochs


class TimeEstimate:
    """The time a sweep has left, from what it has measured so far.

    Before any run has finished, the first epoch's time (training and its evaluation) times the epochs left;
    after that, the mean time of the runs trained in this process (measuring included) times the runs left.
    Both are stated with what they come from, since sparse variants and the baseline differ in speed.
    """

    def __init__(self, runs_to_train: int, epochs_per_run: int):
        self.runs_left = runs_to_train
        self.epochs_per_run = epochs_per_run
        self.run_seconds: list[float] = []
        self._run_start = time.perf_counter()

    def start_run(self) -> None:
        self._run_start = time.perf_counter()

    def first_epoch(self, seconds: float) -> str:
        """The estimate from the first epoch of the first run (``seconds`` with its evaluation)."""
        total = seconds * self.epochs_per_run * self.runs_left
        return (
            f"estimate: first epoch {format_estimate(seconds)}, so about {format_estimate(total)} "
            f"for {self.runs_left} runs of {self.epochs_per_run} epochs, plus measuring each (refined after every run)"
        )

    def skip_run(self) -> None:
        """A run another process took: it no longer counts."""
        self.runs_left -= 1

    def end_run(self) -> str:
        """Record a finished run; the estimate from the runs finished so far."""
        self.run_seconds.append(time.perf_counter() - self._run_start)
        self.runs_left -= 1
        mean = statistics.fmean(self.run_seconds)
        left = "done" if self.runs_left == 0 else f"about {format_estimate(mean * self.runs_left)} left"
        runs = "1 run" if self.runs_left == 1 else f"{self.runs_left} runs"
        return f"run took {format_estimate(self.run_seconds[-1])}; {runs} to go, {left}"
