"""Running an ablation :class:`~sparse_detr.ablation.sweep.Sweep`: train each run, measure it, keep one
``result.json`` per run, and rebuild the report from the results that exist.

Each run (a variant and a seed) trains in its own folder ``<runs_dir>/<variant>/seed<N>/`` with
:func:`sparse_detr.engine.train`, which resumes from the folder's checkpoint, so an interrupted sweep continues
where it stopped. A finished run is then measured: COCO AP (the training's final evaluation;
:func:`~sparse_detr.engine.evaluate_checkpoint` at each inference-time keep ratio), GFLOPs (in total and by
backbone, encoder and the rest) and FPS (the median of many timed passes, with its quartiles) on a few
validation images at the evaluation size, and the DAM coverage on the validation set
(:func:`~sparse_detr.analysis.coverage.dam_coverage`: measured on held-out images with the final model and at
every evaluated ρ, unlike the training log's running value).
The run's ``result.json`` is written last and atomically; a run that has one is skipped.

Several processes (one per GPU, say) share a sweep by taking disjoint shards of its runs; each rebuilds
the report when it ends, atomically, so the last one to finish leaves the complete report.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import torch

from sparse_detr import engine
from sparse_detr.ablation.plan import TimeEstimate, describe_plan
from sparse_detr.ablation.report import write_report
from sparse_detr.ablation.sweep import Run, Sweep, SweepError, placement_free, shard_runs, sweep_to_dict
from sparse_detr.ablation.tables import FPS_KEYS, GFLOP_KEYS, RESULT_NAME, percent
from sparse_detr.analysis.coverage import dam_coverage
from sparse_detr.analysis.flops import count_flops
from sparse_detr.analysis.fps import device_name, measure_fps
from sparse_detr.checkpoint import CHECKPOINT_NAME
from sparse_detr.config import Config, apply_overrides, config_to_dict, get_preset, load_toml
from sparse_detr.data.source import DataSource, DataSplits
from sparse_detr.engine import distributed
from sparse_detr.engine.interrupts import StopSignals
from sparse_detr.engine.run_config import EvalSettings
from sparse_detr.errors import ConfigError, Interrupted
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import atomic_write_text, check_writable
from sparse_detr.utils.lock import FolderInUseError, folder_lock
from sparse_detr.utils.progress import timed_step
from sparse_detr.zoo import load_model

logger = logging.getLogger(__name__)

BUILTIN_DATA = "built-in synthetic dataset"
FAILED_NAME = "failed.json"  # in a run folder: why the job that last trained it failed, and where its log is
SWEEP_FILE = "sweep.toml"  # in the report folder: the sweep it reports on (an experiment file)
# training settings that do not change the trained model
_IGNORED_TRAIN_SETTINGS = (
    "output_dir",
    "resume",
    "auto_resume",
    "device",
    "workers",
    "log_every",
    "checkpoint_every_iters",
    "eval_every_epochs",
    "eval_batch_size",
)

# what measure_model gives, with the metrics: the entry of one inference-time evaluation
MEASUREMENT_KEYS = ("metrics", *GFLOP_KEYS, *FPS_KEYS, "dam_coverage")


def result_path(sweep: Sweep, run: Run) -> Path:
    return sweep.run_root / run.folder / RESULT_NAME


def read_result(path: Path) -> dict[str, Any] | None:
    """A run's stored result, or None when it has not finished."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def mark_failed(folder: str | Path, error: str, log: str | None = None, job: str | None = None) -> None:
    """Record in ``folder`` that the job training it failed (``--status`` shows it; the next submission of
    the sweep trains the run again and removes the record)."""
    record = {"error": error, "log": log, "job": job, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(Path(folder) / FAILED_NAME, json.dumps(record, indent=2))


def read_failure(folder: str | Path) -> dict[str, Any] | None:
    """The failure :func:`mark_failed` recorded in ``folder`` (None: none, or unreadable)."""
    try:
        record = json.loads((Path(folder) / FAILED_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _clean(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def write_result(path: Path, result: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(_clean(result), indent=2))


def run_model_config(sweep: Sweep, run: Run) -> Config:
    """The preset with the sweep's ``[model]`` fields and the run's keep ratio, token ranking and aux loss."""
    config = get_preset(sweep.preset, sweep.backbone)
    overrides = {f"model.{key}": value for key, value in sweep.model.items()}
    try:
        return apply_overrides(config, {**overrides, **run.model_overrides()})
    except (KeyError, ValueError) as error:
        raise SweepError(f"run {run.name}: {error}") from None


def run_train_config(sweep: Sweep, run: Run) -> engine.TrainConfig:
    """The preset's training recipe with the sweep's ``[train]`` fields and the run's seed, in its folder."""
    device = {"device": sweep.device} if sweep.device else {}
    output_dir = str(sweep.run_root / run.folder)
    try:
        return engine.train_recipe(sweep.preset, **sweep.train, **device, seed=run.seed, output_dir=output_dir)
    except (TypeError, ValueError) as error:
        raise SweepError(f"[train]: {error}") from None


def run_settings(sweep: Sweep, run: Run) -> dict[str, Any]:
    """What decides a run's trained model: model config, training settings and data. A stored result made
    with other settings is not reused."""
    train = engine.train_config_to_dict(run_train_config(sweep, run))
    source = sweep.data_source
    data = {"data": BUILTIN_DATA} if source.is_builtin else dataclasses.asdict(source)
    return {
        "preset": sweep.preset,
        "model": config_to_dict(run_model_config(sweep, run))["model"],
        "train": {key: value for key, value in train.items() if key not in _IGNORED_TRAIN_SETTINGS},
        "data": {key: value for key, value in data.items() if value is not None},
    }


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        return [
            difference
            for key in sorted(set(stored) | set(current))
            for difference in _differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        ]
    return [] if stored == current else [f"{prefix[:-1]} (stored {stored!r}, now {current!r})"]


def check_same_settings(result: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    """Refuse to reuse a result (and its checkpoint) trained with other settings."""
    differences = _differences(_clean(result.get("settings", {})), _clean(settings))
    if differences:
        raise SweepError(
            f"{path} was made with other settings: {'; '.join(differences[:3])}. "
            "Use another --name (or --runs-dir), or delete that run folder to train it again"
        )


class _SweepData:
    """The sweep's train/val splits and datasets, made or read on first use."""

    def __init__(self, sweep: Sweep):
        self.source = sweep.data_source
        self._splits: DataSplits | None = None
        self._datasets: dict[int, tuple[Any, Any]] = {}

    @property
    def splits(self) -> DataSplits:
        if self._splits is None:
            self._splits = self.source.splits()
        return self._splits

    def datasets(self, image_size: int):
        if image_size not in self._datasets:
            self._datasets[image_size] = engine.build_datasets(*self.splits, image_size=image_size)
        return self._datasets[image_size]


def benchmark_images(val_set, count: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``count`` validation images at the evaluation size, each (3, H, W) on ``device``."""
    return [val_set[i][0].to(device) for i in range(min(count, len(val_set)))]


def measure_model(
    model,
    images: list[torch.Tensor],
    val_set,
    sweep: Sweep,
    device: torch.device,
    batch_size: int,
    name: str = "the model",
) -> dict[str, Any]:
    """GFLOPs (total and by part) and FPS on ``images`` (each (3, H, W)) and the DAM coverage on ``val_set``
    in batches of ``batch_size``, at the model's current keep ratio. The random token ranking draws from a
    fixed seed. FPS is timed first, after a garbage collection, so that every model is timed in the same
    process state. Status lines (``name``: what the run is) frame the measurement, which takes minutes."""
    settings = sweep.benchmark
    devices = [device.index or 0] if device.type == "cuda" else []
    rho = f" at rho {model.keep_ratio:g}" if model.keep_ratio > 0 else ""
    measuring = f"  {name}: measuring GFLOPs, FPS and DAM coverage{rho}…"
    with timed_step(measuring, f"  {name}: measured", logger), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        model.eval()
        gc.collect()
        fps = measure_fps(model, images, settings.batch_size, warmup=settings.warmup, iters=settings.iters)
        flops = count_flops(model, images)
        coverage = dam_coverage(model, val_set, device, batch_size, settings.coverage_images)
    return {
        "gflops": flops.gflops,
        **{f"gflops_{stage}": value for stage, value in flops.by_stage.items()},
        "fps": fps.fps,
        "fps_q1": fps.fps_q1,
        "fps_q3": fps.fps_q3,
        "dam_coverage": coverage,
    }


def ap_by_epoch(run_dir: Path) -> dict[int, float]:
    """The AP of every evaluation the training made (``eval_epoch{N}.json``), by epoch: the learning curve."""
    curve = {}
    for path in run_dir.glob("eval_epoch*.json"):
        evaluation = json.loads(path.read_text())
        curve[int(evaluation.get("epoch", path.stem.removeprefix("eval_epoch")))] = evaluation.get("AP")
    return dict(sorted(curve.items()))


def _evaluations(result: dict[str, Any]) -> dict[float, dict[str, Any]]:
    return {entry["keep_ratio"]: entry for entry in result.get("evaluations", [])}


def execute_run(
    sweep: Sweep,
    run: Run,
    data: _SweepData,
    stored: dict[str, Any] | None,
    on_first_epoch: Callable[[float], None] | None = None,
    step: str | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) ``run``, measure it, and evaluate it at the keep ratios ``stored`` lacks;
    ``on_first_epoch`` gets the seconds of the first epoch trained here (its evaluation included), ``step``
    names the run in status lines (``[3/8] dam-rho0.1 (seed 1)``; default its label).

    Under ``torchrun`` or in a cluster job's tasks (``WORLD_SIZE`` processes) the processes train the run
    together, sharing its batch (:func:`~sparse_detr.engine.distributed.share_batch`); rank 0 then measures
    it alone and the others return None."""
    model_config, train_config = run_model_config(sweep, run), run_train_config(sweep, run)
    processes = int(os.environ.get("WORLD_SIZE", 1))
    train_set, val_set = data.datasets(train_config.image_size)
    run_dir = Path(train_config.output_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    result = stored
    if result is None:
        logger.info(f"  training in {run_dir}" + (" (resuming from its checkpoint)" if checkpoint.is_file() else ""))
        shared = distributed.share_batch(train_config, processes) if processes > 1 else train_config
        metrics = engine.train(model_config, shared, train_set, val_set, on_first_epoch=on_first_epoch)
    if processes > 1:  # what is left runs on rank 0 alone
        rank = int(os.environ.get("RANK", 0))
        distributed.leave_process_group()
        if rank != 0:
            return None
    device = resolve_device(train_config.device)
    step = step or run.label
    if result is None:
        model = load_model(checkpoint, map_location=device)
        images = benchmark_images(val_set, sweep.benchmark.images, device)
        result = {
            "run": run.name,
            "seed": run.seed,
            "ranking": run.ranking,
            "keep_ratio": run.keep_ratio,
            "enc_aux_loss": run.enc_aux_loss,
            "metrics": metrics,
            "ap_by_epoch": ap_by_epoch(run_dir),
            **measure_model(model, images, val_set, sweep, device, train_config.batch_size_eval, step),
            "evaluations": [],
            "settings": run_settings(sweep, run),
            "measured_on": {
                "device": device_name(device),
                "image_sizes": [list(image.shape[-2:]) for image in images],
                "benchmark": dataclasses.asdict(sweep.benchmark),
            },
            "trained_by": {"processes": processes},
        }
    else:
        if not checkpoint.is_file():
            raise SweepError(f"{run_dir} has a result but no {CHECKPOINT_NAME} to evaluate at other keep ratios")
        model = load_model(checkpoint, map_location=device)
        images = benchmark_images(val_set, sweep.benchmark.images, device)
    done = _evaluations(result)
    for keep_ratio in run.eval_keep_ratios:
        if keep_ratio in done:
            continue
        logger.info(f"  evaluating at rho {keep_ratio:g}")
        if keep_ratio == run.keep_ratio:  # the training's own evaluation
            entry = {key: value for key, value in result.items() if key in MEASUREMENT_KEYS}
        else:
            settings = EvalSettings(
                DataSource(val_images=str(data.splits.val_images), val_ann=str(data.splits.val_ann)),
                keep_ratio=keep_ratio, image_size=train_config.image_size, batch_size=train_config.batch_size_eval,
                workers=train_config.workers, device=str(device),
            )  # fmt: skip
            metrics = engine.evaluate_checkpoint(checkpoint, settings, run_dir)
            model.set_keep_ratio(keep_ratio)
            measured = measure_model(model, images, val_set, sweep, device, train_config.batch_size_eval, step)
            entry = {"metrics": metrics, **measured}
        done[keep_ratio] = {"keep_ratio": keep_ratio, **entry}
    result["evaluations"] = [done[keep_ratio] for keep_ratio in sorted(done)]
    return result


def run_alone(sweep: Sweep, run: Run) -> dict[str, Any] | None:
    """Train and measure one run of ``sweep`` by itself, as a cluster job's task does (with the job's processes,
    see :func:`execute_run`): a finished run is skipped, another's result is checked to be of these settings,
    and its folder is locked while it trains (by rank 0; a failure recorded there is cleared). Rank 0 writes
    the result and returns it; the other processes return None."""
    path = result_path(sweep, run)
    stored = read_result(path)
    if stored is not None:
        check_same_settings(stored, run_settings(sweep, run), path)
        if result_complete(run, stored):
            logger.info(f"{run.label}: finished, skipped")
            return stored if int(os.environ.get("RANK", 0)) == 0 else None
    folder = sweep.run_root / run.folder
    with folder_lock(folder):
        if int(os.environ.get("RANK", 0)) == 0:
            (folder / FAILED_NAME).unlink(missing_ok=True)
        result = execute_run(sweep, run, _SweepData(sweep), stored)
        if result is not None:
            write_result(path, result)
    return result


def _refuse_torchrun() -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SweepError(
            "sdetr ablate trains one model per process; instead of torchrun, start one process per GPU "
            "with --shard I/N (and CUDA_VISIBLE_DEVICES or --device)"
        )


def _stored_sweep(report_dir: Path) -> dict[str, Any] | None:
    """The sweep recorded in a report folder; None when there is none (or it cannot be read)."""
    path = report_dir / SWEEP_FILE
    try:
        return load_toml(path, "sweep record") if path.is_file() else None
    except ConfigError:
        return None


def claim_report_folder(sweep: Sweep, chosen: bool = False, force: bool = False) -> Sweep:
    """``sweep`` placed by :func:`place_sweep`, its folder checked to be writable and the sweep recorded there
    (``sweep.toml``)."""
    placed = place_sweep(sweep, chosen, force)
    check_writable(placed.report_dir)
    _record_sweep(placed)
    return placed


def place_sweep(sweep: Sweep, chosen: bool = False, force: bool = False) -> Sweep:
    """``sweep`` placed where it writes into no other sweep's report (nothing is written: ``--status`` finds a
    sweep's folders this way).

    A report folder that records the same sweep (or is empty) is taken. One that holds another sweep's report:
    when its place was chosen (``chosen``: the user named it, or the sweep file sets ``output``) a
    :class:`SweepError` naming the first differences, unless ``force``; otherwise the sweep takes the next
    numbered name (``default-2``, ...) whose folder is free or records this sweep, its run folders moving with
    it unless ``runs_dir`` places them.
    """
    document = sweep_to_dict(sweep)

    def conflict(candidate: Sweep) -> str | None:
        """Why ``candidate``'s report folder is another sweep's (None: it is free or this sweep's)."""
        folder = candidate.report_dir
        if not folder.is_dir() or not any(folder.iterdir()):
            return None
        stored = _stored_sweep(folder)
        if stored is None:
            return f"no {SWEEP_FILE} says which sweep it reports on"
        differences = _differences(placement_free(stored), placement_free(document))
        return "; ".join(differences[:3]) or None

    placed, reason = sweep, conflict(sweep)
    if reason is not None and (chosen or sweep.output is not None) and not force:
        raise SweepError(
            f"{sweep.report_dir} holds the report of another sweep ({reason}): choose another --name or --output, "
            "or add --force to replace that report"
        )
    if reason is not None and not force:
        number = 2
        while conflict(placed := dataclasses.replace(sweep, name=f"{sweep.name}-{number}")) is not None:
            number += 1
        logger.info(
            f"{sweep.report_dir} holds another sweep's report ({reason}): this one is {placed.name}, its report in "
            f"{placed.report_dir} (--name chooses another)"
        )
    return placed


def _record_sweep(sweep: Sweep) -> None:
    atomic_write_text(sweep.report_dir / SWEEP_FILE, tomli_w.dumps(sweep_to_dict(sweep)))


def run_ablation(
    sweep: Sweep,
    shard: tuple[int, int] = (0, 1),
    *,
    source: str = "the experiment file",
    asked: frozenset[str] | set[str] = frozenset(),
):
    """Run this shard's unfinished runs of ``sweep``, then rebuild the report from every finished run.

    The plan is logged first (:func:`~sparse_detr.ablation.plan.describe_plan`: ``source`` is where the
    settings the user did not ``ask`` for come from), then the estimated time left, from the first epoch on.
    Ctrl-C or SIGTERM stops with an :class:`~sparse_detr.errors.Interrupted` that says where and how to go on.

    Returns:
        The :class:`~sparse_detr.ablation.report.AblationReport` written to ``sweep.report_dir``.
    """
    _refuse_torchrun()
    check_writable(sweep.run_root)
    check_writable(sweep.report_dir)
    runs = shard_runs(sweep.runs(), *shard)
    data = _SweepData(sweep)
    stored = {run: read_result(result_path(sweep, run)) for run in runs}
    for run, result in stored.items():
        if result is not None:
            check_same_settings(result, run_settings(sweep, run), result_path(sweep, run))
    finished = [run for run, result in stored.items() if result is not None and result_complete(run, result)]
    shard_text = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    logger.info(f"ablation {sweep.name}{shard_text}: run folders in {sweep.run_root}, report in {sweep.report_dir}")
    for line in describe_plan(sweep, source, asked, runs, len(finished)):
        logger.info(line)
    to_train = [run for run in runs if run not in finished]
    estimate = TimeEstimate(len(to_train), run_train_config(sweep, runs[0]).epochs if runs else 0)
    for k, run in enumerate(runs, 1):
        step = f"[{k}/{len(runs)}] {run.label}"
        if run in finished:
            logger.info(f"{step}: finished, skipped")
            continue
        try:  # the run folder is locked while this process trains and measures it (shards run side by side)
            with StopSignals().installed(), folder_lock(run_train_config(sweep, run).output_dir):
                stored[run] = read_result(result_path(sweep, run))  # another shard may have finished it since
                if stored[run] is not None and result_complete(run, stored[run]):
                    logger.info(f"{step}: finished by another process, skipped")
                    estimate.skip_run()
                    continue
                logger.info(step)
                estimate.start_run()
                result = execute_run(
                    sweep, run, data, stored[run], None if estimate.run_seconds else _say_first_epoch(estimate), step
                )
                write_result(result_path(sweep, run), result)
        except FolderInUseError as error:
            logger.info(f"{step}: skipped, {error}")
            estimate.skip_run()
            continue
        except (KeyboardInterrupt, Interrupted) as interrupt:
            done = len(finished) + len(estimate.run_seconds)
            raise Interrupted(
                f"ablation {sweep.name} stopped during run {k}/{len(runs)} ({run.label}); {done} runs are finished "
                "and the interrupted one keeps its checkpoint: run the same command again to continue",
                exit_code=getattr(interrupt, "exit_code", Interrupted.exit_code),
            ) from None
        logger.info(f"{step}: AP {percent(result['metrics']['AP']):.1f}, GFLOPs {result['gflops']:.3f}, "
            f"FPS {result['fps']:.1f}; {estimate.end_run()}")  # fmt: skip
    return write_sweep_report(sweep)


def _say_first_epoch(estimate: TimeEstimate) -> Callable[[float], None]:
    return lambda seconds: logger.info(estimate.first_epoch(seconds))


def result_complete(run: Run, result: dict[str, Any]) -> bool:
    """Whether a stored result holds every evaluation ``run`` asks for."""
    return set(run.eval_keep_ratios) <= set(_evaluations(result))


def write_sweep_report(sweep: Sweep):
    """Rebuild ``sweep``'s report from its finished runs (None when none has finished), with the sweep
    itself as ``sweep.toml``."""
    report = write_report(sweep.run_root, sweep.report_dir, sweep.runs(), title=f"Ablation: {sweep.name}")
    if report is not None:
        _record_sweep(sweep)
    return report
