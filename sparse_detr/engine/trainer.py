"""The training loop: AdamW on the weighted losses of SPEC §6, checkpoints, resume, evaluation, reports.

Reading order: :func:`train_run` (a resolved configuration) reads the data and calls :func:`train`, which
sets the run up (:func:`~sparse_detr.engine.setup.set_up`, a :class:`~sparse_detr.engine.setup.TrainingSession`)
and calls :func:`fit`, which runs :func:`train_one_epoch` per epoch (with the run's progress, logs and
checkpoints), then checkpoints and evaluates; an epoch is a :func:`~sparse_detr.engine.step.train_step` per
``grad_accum`` batches. The same code runs in one process and under ``torchrun`` (one process per device,
gloo on CPUs, NCCL on GPUs); only rank 0 writes to the output folder. A checkpoint is written only when its
model is good (:func:`save`); Ctrl-C or SIGTERM stops the run after the step under way, with a checkpoint of
it (:func:`_interrupted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from sparse_detr.checkpoint import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, save_checkpoint
from sparse_detr.config import Config, TrainConfig, train_config_to_dict
from sparse_detr.engine import distributed
from sparse_detr.engine.evaluate import evaluate, metrics_json, read_metrics
from sparse_detr.engine.initialization import InitialWeights, resolve_initial_weights
from sparse_detr.engine.interrupts import Stop
from sparse_detr.engine.logging import Progress, require_tensorboard
from sparse_detr.engine.run_checks import check_input_size
from sparse_detr.engine.run_config import RunConfig
from sparse_detr.engine.run_folder import clear_run
from sparse_detr.engine.setup import TrainingSession, build_datasets, set_up
from sparse_detr.engine.state import Position, TrainingState, find_resume_path, rng_state
from sparse_detr.engine.step import Diverged, StepResult, batch_to, train_step
from sparse_detr.errors import Interrupted, NonFiniteError, OutputError
from sparse_detr.models import SetCriterion
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import atomic_write_text, check_writable
from sparse_detr.utils.lock import folder_lock

FINAL_METRICS_FILE = "metrics_final.json"


class NonFiniteLossError(NonFiniteError):
    """Training met NaN or infinite values; the run stopped without overwriting its last checkpoint."""


def train_run(run_config: RunConfig, replace: bool = False) -> dict[str, float]:
    """Train what ``run_config`` describes (see :mod:`~sparse_detr.engine.run_config`; its folder as
    :func:`~sparse_detr.engine.run_folder.choose_run_folder` chose it): its options are checked and its
    starting weights fetched before any work (in one process; under ``torchrun`` :func:`train` does it rank
    0 first), then, with the run folder locked against other processes, its data is read and :func:`train`
    runs. ``replace`` starts a new run in the folder, removing the files of the run it holds (``--force``)."""
    resolve_device(run_config.train.device)
    check_input_size(run_config.config, run_config.train)
    check_writable(run_config.train.output_dir)
    weights = None
    single_process = int(os.environ.get("WORLD_SIZE", 1)) == 1
    resume_path = find_resume_path(run_config.train.output_dir, run_config.train.resume, run_config.train.auto_resume)
    if single_process and (replace or resume_path is None):
        weights = resolve_initial_weights(run_config.config, run_config.train.init)
    with folder_lock(run_config.train.output_dir):
        if replace and int(os.environ.get("RANK", 0)) == 0:
            clear_run(run_config.train.output_dir)
        train_set, val_set = build_datasets(*run_config.data.splits(), image_size=run_config.train.image_size)
        return train(run_config.config, run_config.train, train_set, val_set, weights)


def train(
    model_config: Config,
    train_config: TrainConfig,
    train_set,
    val_set,
    initial_weights: InitialWeights | None = None,
    on_first_epoch: Callable[[float], None] | None = None,
) -> dict[str, float]:
    """Train ``model_config`` on ``train_set``, evaluate on ``val_set``, and return the final COCO metrics.

    ``train_set`` / ``val_set`` are ``CocoDetection``-like: samples ``(image, target)``, attributes
    ``num_classes``, ``label_to_category_id``, ``category_names`` and (``val_set``) ``coco``. The model's
    ``num_classes`` is set from the training set. A new run starts from ``initial_weights`` (default: what
    :func:`~sparse_detr.engine.initialization.resolve_initial_weights` finds for ``model_config`` and
    ``train_config.init``: the backbone's pretrained weights, or the checkpoint to fine-tune). Writes to
    ``train_config.output_dir``: ``config.toml`` (the resolved configuration), ``initial_weights.json``,
    ``metrics.jsonl``, ``checkpoint.pth``, ``eval_epoch{N}.json``, ``detections_epoch{N}.json`` and
    ``metrics_final.json``. Resumes from ``train_config.resume`` or, with ``auto_resume``, from the
    folder's own checkpoint. Raises :class:`NonFiniteLossError` if training diverges, and
    :class:`~sparse_detr.errors.Interrupted` on Ctrl-C or SIGTERM (after saving the last whole step).
    ``on_first_epoch`` gets the seconds of the first epoch this call trains, its evaluation included (for
    time estimates).
    """
    info = distributed.init_distributed(train_config.device)
    progress = Progress(info.is_main, train_config.log_every)
    if train_config.tensorboard:
        require_tensorboard()
    check_input_size(model_config, train_config)
    if info.is_main:
        check_writable(train_config.output_dir)
    if model_config.model.num_classes != train_set.num_classes:
        progress.message(_num_classes_note(train_set.num_classes, len(train_set.category_names)))
        model_config = dataclasses.replace(
            model_config, model=dataclasses.replace(model_config.model, num_classes=train_set.num_classes)
        )
    resume_path = find_resume_path(train_config.output_dir, train_config.resume, train_config.auto_resume)
    if resume_path is None and initial_weights is None:
        initial_weights = distributed.main_first(lambda: resolve_initial_weights(model_config, train_config.init))
    session = set_up(model_config, train_config, train_set, val_set, info, progress, resume_path, initial_weights)
    if resume_path is not None:
        session.good_checkpoint, session.good_step = resume_path, session.state.position.step
    try:
        with session.signals.installed():
            return fit(session, on_first_epoch)
    except Stop as stop:
        raise _interrupted(session, stop) from None
    finally:
        session.log.close()


def _num_classes_note(num_classes: int, categories: int) -> str:
    """Why the model gets ``num_classes`` class slots for the training set's ``categories``."""
    if num_classes == categories:
        return f"num_classes: {num_classes} (one per category of the training set)"
    return (
        f"num_classes: {num_classes} for {categories} categories: their ids are the class labels, as in the "
        f"reference (largest id + 1; labels without a category are never predicted)"
    )


def fit(session: TrainingSession, on_first_epoch: Callable[[float], None] | None = None) -> dict[str, float]:
    """Train from the run's position to ``config.epochs``, checkpointing after every epoch and evaluating
    when due; returns the final metrics (a finished run returns its stored ones). ``on_first_epoch`` gets
    the seconds of the first epoch trained here, its evaluation included."""
    config, final = session.config, session.output_dir / FINAL_METRICS_FILE
    start = session.state.position
    if start.epoch >= config.epochs and final.is_file():
        session.progress.message(f"{session.output_dir} already finished {config.epochs} epochs")
        return read_metrics(final)
    metrics = None
    if start.iteration == 0 and start.epoch > 0 and _evaluation_due(config, start.epoch):
        metrics = evaluate_epoch(session, start.epoch, skip_if_done=True)  # killed before its evaluation
    for epoch in range(start.epoch, config.epochs):
        epoch_start = time.perf_counter()
        _train_epoch(session, epoch)
        with session.signals.deferred():  # schedule, position, statistics and checkpoint move on together
            session.state.end_epoch()
            distributed.average_buffers(session.model)
            save(session)
        if _evaluation_due(config, epoch + 1):
            metrics = evaluate_epoch(session, epoch + 1)
        if on_first_epoch is not None and epoch == start.epoch:
            on_first_epoch(time.perf_counter() - epoch_start)
    if metrics is None:
        metrics = evaluate_epoch(session, config.epochs)
    if session.info.is_main:
        atomic_write_text(final, metrics_json(metrics))
    distributed.barrier()
    return metrics


def _evaluation_due(config: TrainConfig, epochs_done: int) -> bool:
    return epochs_done % config.eval_every_epochs == 0 or epochs_done == config.epochs


@dataclass(frozen=True)
class StepDone:
    """An optimizer step of an epoch, done: its result, the batches of the epoch done after it
    (``iteration``), the seconds it waited for data, and its last batch's images and mask."""

    result: StepResult
    iteration: int
    data_seconds: float
    last_batch: tuple[torch.Tensor, torch.Tensor]


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: DataLoader,
    state: TrainingState,
    recipe: TrainConfig,
    device: torch.device,
    epoch: int,
    deferred: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Iterator[StepDone]:
    """Train epoch ``epoch`` from ``state.position`` (a resumed epoch skips the batches already done): a
    :func:`~sparse_detr.engine.step.train_step` per ``recipe.grad_accum`` batches of ``loader`` (whose batch
    sampler serves whole steps), the position moved on after each. ``model`` is the module whose forward trains
    (DDP's wrapper when distributed).

    Yields after every step, still inside ``deferred()``: a stop signal waits for the step and for what the
    caller does with it (log it, checkpoint).

    Raises:
        Diverged: with ``where`` (the epoch and batch, or the step) filled in.
    """
    skip = state.position.batches_done(epoch)
    loader.batch_sampler.set_epoch(epoch, skip)
    model.train()
    data_tic = time.perf_counter()
    for first, batches in _step_batches(enumerate(loader, start=skip), recipe.grad_accum):
        with deferred():
            data_seconds = time.perf_counter() - data_tic
            batches = [batch_to(batch, device) for batch in batches]
            try:
                result = train_step(model, criterion, batches, state.optimizer, state.scaler, device,
                                    recipe.clip_max_norm, recipe.amp)  # fmt: skip
            except Diverged as diverged:
                diverged.where = f"step {state.position.step + 1}" if diverged.batch is None else (
                    f"epoch {epoch + 1}, batch {first + diverged.batch + 1}"
                )  # fmt: skip
                raise
            state.position = Position(epoch, first + len(batches), state.position.step + 1)
            yield StepDone(result, first + len(batches), data_seconds, batches[-1][:2])
        data_tic = time.perf_counter()


def _train_epoch(session: TrainingSession, epoch: int) -> None:
    """:func:`train_one_epoch` with the run's reports: the progress, a window of loss means every
    ``log_every`` steps, a checkpoint every ``checkpoint_every_iters`` steps; Ctrl-C waits for each step and
    its reports."""
    config, state, num_batches = session.config, session.state, session.batches.num_batches
    skip = state.position.batches_done(epoch)
    session.progress.start_epoch(epoch, config.epochs, num_batches, skip)
    window: dict[str, float] = defaultdict(float)
    window_steps, tic = 0, time.perf_counter()
    steps = train_one_epoch(session.train_model, session.criterion, session.train_loader, state, config,
                            session.device, epoch, session.signals.deferred)  # fmt: skip
    with contextlib.closing(steps):  # a step's reports that fail leave no step half-deferred
        try:
            for done in steps:
                session.last_batch = done.last_batch
                window["data_time"] += done.data_seconds
                for key, value in done.result.losses.items():
                    window[key] += value
                window["grad_norm"] += done.result.grad_norm
                window_steps += 1
                session.progress.update(
                    done.iteration, done.result.losses["loss"], state.optimizer.param_groups[0]["lr"]
                )
                if state.position.step % config.log_every == 0 or done.iteration == num_batches:
                    _log_window(session, window, window_steps, time.perf_counter() - tic)
                    window, window_steps, tic = defaultdict(float), 0, time.perf_counter()
                every = config.checkpoint_every_iters
                if every and state.position.step % every == 0 and done.iteration < num_batches:
                    save(session)
        except Diverged as diverged:
            _stop(session, diverged.what, diverged.where)
    session.progress.end_epoch()


def _stop(session: TrainingSession, what: str, where: str) -> None:
    """Raise :class:`NonFiniteLossError`: ``what`` became NaN or infinite at ``where``; the last good
    checkpoint (:func:`save` writes no other) stays the one to resume from."""
    if session.good_checkpoint is not None:
        kept = f"the last good checkpoint {session.good_checkpoint} (step {session.good_step}) is kept"
        advice = f"Resume from it with --resume {_run_folder(session.good_checkpoint)} and a lower --lr"
    else:
        kept, advice = "no checkpoint had been written yet", "Start again with a lower --lr"
    raise NonFiniteLossError(
        f"{what} became NaN or infinite at {where} (after step {session.state.position.step}); training stopped "
        f"and {kept}. {advice} (or --amp bf16 instead of fp16), or check the annotations."
    )


def _interrupted(session: TrainingSession, stop: Stop) -> Interrupted:
    """Ctrl-C or SIGTERM stopped the run: checkpoint the last whole step if it is not yet (rank 0 alone,
    without collectives: the other processes may be gone), and say where the run stopped and how to go on."""
    position = session.state.position
    if (
        not stop.mid_step
        and position.step > 0
        and (session.good_checkpoint is None or position.step > session.good_step)
    ):
        save(session, collective=False)
    if position.iteration == 0 and position.epoch > 0:
        where = f"after epoch {position.epoch} (step {position.step})"
    else:
        where = f"in epoch {position.epoch + 1} after batch {position.iteration} of {session.batches.num_batches} "
        where += f"(step {position.step})"
    if session.good_checkpoint is None:
        return Interrupted(f"training stopped by {stop.name} {where}, before any checkpoint was written: run the "
                           "same command again to start over", stop.exit_code)  # fmt: skip
    folder, config = _run_folder(session.good_checkpoint), session.config
    own = session.good_checkpoint == session.output_dir / CHECKPOINT_NAME
    same_command = own and config.resume is None and config.auto_resume  # it resumes from the folder's own
    how = f"run the same command again to resume (or add --resume {folder})" if same_command else (
        f"resume with --resume {folder}"
    )  # fmt: skip
    return Interrupted(
        f"training stopped by {stop.name} {where}; {session.good_checkpoint} holds step {session.good_step}: {how}",
        stop.exit_code,
    )


def _run_folder(checkpoint: Path) -> Path:
    """What ``--resume`` takes for ``checkpoint``: its run folder, or the file itself under another name."""
    return checkpoint.parent if checkpoint.name == CHECKPOINT_NAME else checkpoint


def _log_window(session: TrainingSession, window: dict[str, float], steps: int, elapsed: float) -> None:
    means = distributed.all_reduce_mean({key: value / steps for key, value in window.items()}, session.device)
    position = session.state.position
    record = {"epoch": position.epoch + 1, "iteration": position.iteration, "step": position.step}
    for group in session.state.optimizer.param_groups:
        record["lr" if group["name"] == "default" else f"lr_{group['name']}"] = group["lr"]
    record["time_per_iter"] = elapsed / steps
    record.update(sorted(means.items()))
    session.log.write(record, position.step)


def save(session: TrainingSession, collective: bool = True) -> None:
    """Checkpoint (rank 0 writes; every process's generator states are gathered into it) a good model: one
    whose weights and statistics are finite and whose outputs, in evaluation mode (as eval and predict run
    it), are finite on the last training batch. Any other stops the run and never replaces the last good
    checkpoint. ``collective=False`` (on Ctrl-C, when the other processes may be gone): rank 0 alone checks
    and writes, with its own generator states.

    Raises:
        NonFiniteLossError: the model is not good.
        OutputError: the checkpoint cannot be written (the disk is full); the previous one stays.
    """
    if not collective and not session.info.is_main:
        return
    step = session.state.position.step
    problem = _model_problem(session)
    if distributed.any_process(problem is not None, session.device) if collective else problem is not None:
        _stop(session, problem or "another process's model", f"the checkpoint of step {step}")
    states = distributed.gather_to_main(rng_state(session.device)) if collective else [rng_state(session.device)]
    if session.info.is_main:
        path = session.output_dir / CHECKPOINT_NAME
        try:
            training = session.state.to_checkpoint(
                rng=states, sampler={"seed": session.config.seed}, initial_weights=session.initial_weights
            )
            train_config = train_config_to_dict(session.config)
            save_checkpoint(path, session.model, training, session.categories, train_config)
        except OutputError as error:
            good = session.good_checkpoint
            kept = f"{good} (step {session.good_step}) is kept to resume from" if good else "no checkpoint was written"
            raise OutputError(f"{error}; training stopped at step {step} and {kept}") from None
    session.good_checkpoint, session.good_step = session.output_dir / CHECKPOINT_NAME, step
    if collective:
        distributed.barrier()


def _model_problem(session: TrainingSession) -> str | None:
    """What keeps the run's model from being checkpointed as good (None: nothing): weights or statistics that
    are not finite, or outputs that are not, in evaluation mode, on the last training batch (a blow-up that
    training mode's batch statistics still hide)."""
    if not all(bool(torch.isfinite(value).all()) for value in session.model.state_dict().values()
               if value.is_floating_point()):  # fmt: skip
        return "the weights"
    if session.last_batch is None:
        return None
    training = session.model.training
    session.model.eval()
    devices = [session.device.index or 0] if session.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the random token ranking draws at inference
        outputs = session.model(*session.last_batch)
    session.model.train(training)
    if all(bool(torch.isfinite(outputs[key]).all()) for key in ("pred_logits", "pred_boxes")):
        return None
    return "the model's outputs in evaluation mode"


def evaluate_epoch(session: TrainingSession, epochs_done: int, skip_if_done: bool = False) -> dict[str, float]:
    """Evaluate after ``epochs_done`` epochs into ``eval_epoch{N}.json``; the training generators are left
    untouched (the random token ranking draws at inference too)."""
    result = session.output_dir / f"eval_epoch{epochs_done}.json"
    if skip_if_done and result.is_file():
        return read_metrics(result)
    devices = [session.device.index or 0] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        metrics = evaluate(
            session.model, session.val_loader, session.val_set.coco, session.label_to_category_id, session.device,
            session.output_dir / f"detections_epoch{epochs_done}.json", progress=f"evaluating epoch {epochs_done}",
        )  # fmt: skip
    if session.info.is_main:
        _keep_if_best(session, metrics, epochs_done)  # before its result: a resumed run re-decides
        atomic_write_text(result, metrics_json(metrics, epoch=epochs_done))
        session.log.write({"epoch": epochs_done, **{f"eval_{key}": value for key, value in metrics.items()}},
                      session.state.position.step, "eval")  # fmt: skip
        session.progress.message(f"epoch {epochs_done}: AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}")
    return metrics


def _keep_if_best(session: TrainingSession, metrics: Mapping[str, float], epochs_done: int) -> None:
    """Write the model as the run's ``checkpoint_best.pth`` (weights only, with its epoch and AP) when its
    validation AP beats every earlier evaluation of the run (ties keep the earlier one)."""
    earlier = [read_metrics(path)["AP"] for path in session.output_dir.glob("eval_epoch*.json")
               if path.name != f"eval_epoch{epochs_done}.json"]  # fmt: skip
    if math.isnan(metrics["AP"]) or any(metrics["AP"] <= ap for ap in earlier if not math.isnan(ap)):
        return
    best = {"epoch": epochs_done, "AP": metrics["AP"]}
    train_config = train_config_to_dict(session.config)
    save_checkpoint(session.output_dir / BEST_CHECKPOINT_NAME, session.model, None, session.categories, train_config,
                    best)  # fmt: skip


def _step_batches(batches: Iterable[tuple[int, Any]], size: int) -> Iterator[tuple[int, list[Any]]]:
    """``(first iteration, [batch, ...])`` for each run of ``size`` consecutive ``(iteration, batch)`` pairs:
    the batches of one optimizer step (the sampler serves whole steps)."""
    group, first = [], 0
    for iteration, batch in batches:
        if not group:
            first = iteration
        group.append(batch)
        if len(group) == size:
            yield first, group
            group = []
