"""The training loop: AdamW on the weighted losses of SPEC §6, checkpoints, resume, evaluation, reports.

Reading order: :func:`train_run` (a resolved configuration) reads the data and calls :func:`train`, which
sets a run up (:class:`Run`) and calls :func:`fit`, which runs
:func:`train_one_epoch` per epoch, then checkpoints and evaluates. :func:`train_step` is one optimizer step
over ``grad_accum`` batches. The same code runs in one process and under ``torchrun`` (one process per
device, gloo on CPUs, NCCL on GPUs); only rank 0 writes to the output folder. A checkpoint is written only
when its model is good (:func:`save`); Ctrl-C or SIGTERM stops the run after the step under way, with a
checkpoint of it (:func:`_interrupted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader

from sparse_detr.checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from sparse_detr.config import Config, TrainConfig, train_config_to_dict
from sparse_detr.data.source import DataSource
from sparse_detr.engine import distributed
from sparse_detr.engine.evaluate import build_eval_loader, evaluate, metrics_json, read_metrics
from sparse_detr.engine.initialization import InitialWeights, init_from_checkpoint, resolve_initial_weights
from sparse_detr.engine.interrupts import Stop, StopSignals
from sparse_detr.engine.logging import MetricsLog, Progress, require_tensorboard
from sparse_detr.engine.optim import build_optimizer, build_scheduler
from sparse_detr.engine.run_checks import check_input_size, check_resumable
from sparse_detr.engine.run_config import CONFIG_FILE_NAME, RunConfig
from sparse_detr.engine.run_folder import clear_run
from sparse_detr.engine.sampling import EpochBatchSampler, SeededSamples
from sparse_detr.engine.state import Position, TrainingState, find_resume_path, rng_state, set_rng_state
from sparse_detr.errors import Interrupted, NonFiniteError, OutputError
from sparse_detr.models import SetCriterion, build_criterion, build_model
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import atomic_write_text, check_writable, remove_temporaries
from sparse_detr.utils.lock import folder_lock
from sparse_detr.utils.precision import autocast

INITIAL_WEIGHTS_FILE = "initial_weights.json"
FINAL_METRICS_FILE = "metrics_final.json"


class NonFiniteLossError(NonFiniteError):
    """Training met NaN or infinite values; the run stopped without overwriting its last checkpoint."""


def build_datasets(train_images, train_ann, val_images, val_ann, image_size: int = 800):
    """Training (augmented, SPEC §6) and evaluation ``CocoDetection`` sets at ``image_size``
    (the evaluation shorter side; training sizes are the COCO recipe scaled by ``image_size / 800``)."""
    from sparse_detr.data import CocoDetection, build_transforms, eval_transform, scaled_sizes

    train_set = CocoDetection(train_images, train_ann, build_transforms(True, **scaled_sizes(image_size)._asdict()),
                              train=True)  # fmt: skip
    val_set = CocoDetection(val_images, val_ann, eval_transform(image_size))
    return train_set, val_set


@dataclass
class Run:
    """Everything one training run works with."""

    config: TrainConfig
    model: nn.Module
    criterion: SetCriterion
    state: TrainingState
    batches: EpochBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_set: Any
    label_to_category_id: dict[int, int]  # the training set's: the labels the model predicts
    info: distributed.DistInfo
    progress: Progress
    log: MetricsLog
    checkpoint_extras: dict[str, Any]  # categories and initial weights, stored in every checkpoint
    ddp: DistributedDataParallel | None = None
    signals: StopSignals = field(default_factory=StopSignals)
    good_checkpoint: Path | None = None  # the last checkpoint known to be good (the one to resume from)
    good_step: int = 0  # and its step
    last_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # images and mask, to try a checkpoint's model on

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def train_model(self) -> nn.Module:
        """The module whose forward trains: DDP's wrapper when distributed."""
        return self.ddp if self.ddp is not None else self.model


def train_run(run: RunConfig, replace: bool = False) -> dict[str, float]:
    """Train what ``run`` describes (see :mod:`~sparse_detr.engine.run_config`; its folder as
    :func:`~sparse_detr.engine.run_folder.choose_run_folder` chose it): its options are checked and its
    starting weights fetched before any work (in one process; under ``torchrun`` :func:`train` does it rank
    0 first), then, with the run folder locked against other processes, its data is read and :func:`train`
    runs. ``replace`` starts a new run in the folder, removing the files of the run it holds (``--force``)."""
    resolve_device(run.train.device)
    check_input_size(run.config, run.train)
    check_writable(run.train.output_dir)
    weights = None
    single_process = int(os.environ.get("WORLD_SIZE", 1)) == 1
    resume_path = find_resume_path(run.train.output_dir, run.train.resume, run.train.auto_resume)
    if single_process and (replace or resume_path is None):
        weights = resolve_initial_weights(run.config, run.train.init)
    with folder_lock(run.train.output_dir):
        if replace and int(os.environ.get("RANK", 0)) == 0:
            clear_run(run.train.output_dir)
        train_set, val_set = build_datasets(*run.data.splits(), image_size=run.train.image_size)
        return train(run.config, run.train, train_set, val_set, weights)


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
        progress.message(f"num_classes: {train_set.num_classes} (from the training set's categories)")
        model_config = dataclasses.replace(
            model_config, model=dataclasses.replace(model_config.model, num_classes=train_set.num_classes)
        )
    if info.is_main:
        _warn_boxes_beyond_queries(train_set, model_config.model.num_queries)
    resume_path = find_resume_path(train_config.output_dir, train_config.resume, train_config.auto_resume)
    if resume_path is None and initial_weights is None:
        initial_weights = distributed.main_first(lambda: resolve_initial_weights(model_config, train_config.init))
    run = _set_up(model_config, train_config, train_set, val_set, info, progress, resume_path, initial_weights)
    if resume_path is not None:
        run.good_checkpoint, run.good_step = resume_path, run.state.position.step
    try:
        with run.signals.installed():
            return fit(run, on_first_epoch)
    except Stop as stop:
        raise _interrupted(run, stop) from None
    finally:
        run.log.close()


def _set_up(
    model_config: Config,
    config: TrainConfig,
    train_set,
    val_set,
    info: distributed.DistInfo,
    progress: Progress,
    resume_path: Path | None,
    initial_weights: InitialWeights | None,
) -> Run:
    """Build the model (from the pretrained backbone, the checkpoint to fine-tune or the one to resume),
    criterion, optimizer state, data loaders and reports of a run; write its configuration."""
    checkpoint = read_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None:
        check_resumable(checkpoint, model_config, train_set.category_names, resume_path, config.allow_other_categories)
    torch.manual_seed(config.seed + info.rank)
    model = build_model(model_config, initial_weights.backbone if checkpoint is None else None).to(info.device)
    if checkpoint is None and initial_weights.checkpoint is not None:
        init = initial_weights.checkpoint
        report = init_from_checkpoint(model, init.file, train_set.category_names, init.with_backbone)
        for line in report.lines(f"{init.source} ({init.file}, sha256 {init.sha256[:12]})"):
            progress.message(line)
    optimizer = build_optimizer(model, config, info.world_size)
    scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp == "fp16")
    state = TrainingState(optimizer, build_scheduler(optimizer, config), scaler)
    extras = {
        # label -> (category id, name): lets predict/visualize name the classes of a checkpoint
        "categories": {
            label: {"id": int(category_id), "name": train_set.category_names[label]}
            for label, category_id in train_set.label_to_category_id.items()
        },
        "initial_weights": checkpoint.get("initial_weights") if checkpoint is not None else initial_weights.to_dict(),
    }
    if checkpoint is not None:
        _restore(model, state, checkpoint, resume_path, config, info, progress)
    ddp = None
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=config.find_unused_parameters
        )

    from sparse_detr.data import collate

    batches = EpochBatchSampler(
        train_set, config.batch_size, config.seed, info.rank, info.world_size, config.iters_per_epoch, config.grad_accum
    )
    train_loader = DataLoader(
        SeededSamples(train_set),
        batch_sampler=batches,
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        persistent_workers=config.workers > 0,
        # the loader's own seed draw must not consume the global generator (dropout's)
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = build_eval_loader(val_set, config.batch_size_eval, config.workers)
    output_dir = Path(config.output_dir)
    if info.is_main:
        for leftover in remove_temporaries(output_dir):  # from writes a killed run left halfway
            progress.message(f"removed {leftover}, a file a killed write left")
    log = MetricsLog(output_dir, info.is_main, config.tensorboard, state.position.step)
    if info.is_main:
        run_config = RunConfig(model_config, config, _data_source(train_set, val_set))
        atomic_write_text(output_dir / CONFIG_FILE_NAME, run_config.to_toml())
        atomic_write_text(output_dir / INITIAL_WEIGHTS_FILE, json.dumps(extras["initial_weights"], indent=2))
    return Run(
        config, model, build_criterion(model_config).to(info.device), state, batches, train_loader, val_loader,
        val_set, train_set.label_to_category_id, info, progress, log, extras, ddp,
    )  # fmt: skip


def _restore(model, state: TrainingState, checkpoint: dict[str, Any], path: Path, config, info, progress) -> None:
    """Continue where ``checkpoint`` stopped: weights, optimizer state, position and generators."""
    model.load_state_dict(checkpoint["model"])
    changed = state.load_state_dict(checkpoint) + _move_lr_drop(state, config.lr_drop)
    if changed:
        progress.message(f"learning rates changed on resume: {', '.join(changed)}")
    states = checkpoint.get("rng") or []
    if len(states) == info.world_size:
        set_rng_state(states[info.rank], info.device)
    else:  # another number of processes: a fresh but reproducible draw
        torch.manual_seed(config.seed + info.rank + state.position.step)
    position = state.position
    progress.message(
        f"resumed from {path}: epoch {position.epoch + 1}, batch {position.iteration}, step {position.step}"
    )


def _move_lr_drop(state: TrainingState, lr_drop: int) -> list[str]:
    """A resumed run with another ``lr_drop`` drops after that epoch: the restored schedule's milestone moves
    and the rates follow (lowered if the run is past the new drop and not the old one, raised back in the
    opposite case); returns the change, as ``"lr_drop old -> new"``."""
    scheduler = state.scheduler
    (old,) = scheduler.milestones
    if old == lr_drop:
        return []
    epochs_done = scheduler.last_epoch
    factor = (scheduler.gamma if epochs_done >= lr_drop else 1.0) / (scheduler.gamma if epochs_done >= old else 1.0)
    for group in state.optimizer.param_groups:
        group["lr"] *= factor
    scheduler.milestones = Counter([lr_drop])
    return [f"lr_drop {old} -> {lr_drop}"]


def fit(run: Run, on_first_epoch: Callable[[float], None] | None = None) -> dict[str, float]:
    """Train from the run's position to ``config.epochs``, checkpointing after every epoch and evaluating
    when due; returns the final metrics (a finished run returns its stored ones). ``on_first_epoch`` gets
    the seconds of the first epoch trained here, its evaluation included."""
    config, final = run.config, run.output_dir / FINAL_METRICS_FILE
    start = run.state.position
    if start.epoch >= config.epochs and final.is_file():
        run.progress.message(f"{run.output_dir} already finished {config.epochs} epochs")
        return read_metrics(final)
    metrics = None
    if start.iteration == 0 and start.epoch > 0 and _evaluation_due(config, start.epoch):
        metrics = evaluate_epoch(run, start.epoch, skip_if_done=True)  # killed before its evaluation
    for epoch in range(start.epoch, config.epochs):
        epoch_start = time.perf_counter()
        train_one_epoch(run, epoch)
        with run.signals.deferred():  # schedule, position, statistics and checkpoint move on together
            run.state.end_epoch()
            distributed.average_buffers(run.model)
            save(run)
        if _evaluation_due(config, epoch + 1):
            metrics = evaluate_epoch(run, epoch + 1)
        if on_first_epoch is not None and epoch == start.epoch:
            on_first_epoch(time.perf_counter() - epoch_start)
    if metrics is None:
        metrics = evaluate_epoch(run, config.epochs)
    if run.info.is_main:
        atomic_write_text(final, metrics_json(metrics))
    distributed.barrier()
    return metrics


def _evaluation_due(config: TrainConfig, epochs_done: int) -> bool:
    return epochs_done % config.eval_every_epochs == 0 or epochs_done == config.epochs


def train_one_epoch(run: Run, epoch: int) -> None:
    """One epoch from the run's position (a resumed epoch skips the batches already done); logs a window
    of loss means every ``log_every`` steps and checkpoints every ``checkpoint_every_iters`` steps."""
    config, state = run.config, run.state
    skip = state.position.iteration if epoch == state.position.epoch else 0
    run.batches.set_epoch(epoch, skip)
    run.train_model.train()
    run.progress.start_epoch(epoch, config.epochs, run.batches.num_batches, skip)
    window: dict[str, float] = defaultdict(float)
    window_steps, tic = 0, time.perf_counter()
    data_tic = tic
    for first, batches in _step_batches(enumerate(run.train_loader, start=skip), config.grad_accum):
        with run.signals.deferred():  # Ctrl-C waits for the step, its position, log line and checkpoint
            window["data_time"] += time.perf_counter() - data_tic
            step_losses, grad_norm = train_step(run, batches, epoch, first)
            for key, value in step_losses.items():
                window[key] += value
            window["grad_norm"] += grad_norm
            window_steps += 1
            iteration = first + len(batches)
            state.position = Position(epoch, iteration, state.position.step + 1)
            run.progress.update(iteration, step_losses["loss"], state.optimizer.param_groups[0]["lr"])
            if state.position.step % config.log_every == 0 or iteration == run.batches.num_batches:
                _log_window(run, window, window_steps, time.perf_counter() - tic)
                window, window_steps, tic = defaultdict(float), 0, time.perf_counter()
            every = config.checkpoint_every_iters
            if every and state.position.step % every == 0 and iteration < run.batches.num_batches:
                save(run)
        data_tic = time.perf_counter()
    run.progress.end_epoch()


def train_step(run: Run, batches: list, epoch: int, first: int) -> tuple[dict[str, float], float]:
    """One optimizer step over ``batches`` (``grad_accum`` of them, batch ``first`` onwards): each batch's
    share of the step's loss is backpropagated, then the gradients are clipped and applied.

    Returns:
        the step's losses (summed over its batches, like one large batch's; log-only metrics averaged) with
        ``loss`` the weighted sum, and the gradient norm before clipping.
    """
    batches = [_to_device(batch, run.device) for batch in batches]
    run.last_batch = batches[-1][:2]
    # every batch is normalized by the box count of the whole step, so the batches add up to one batch
    num_boxes = _step_num_boxes([targets for _, _, targets in batches], run.device)
    step_losses: dict[str, float] = defaultdict(float)
    for index, (images, mask, targets) in enumerate(batches):
        where = f"epoch {epoch + 1}, batch {first + index + 1}"
        losses = _forward_backward(run, images, mask, targets, num_boxes, where, steps_now=index == len(batches) - 1)
        for key, value in losses.items():
            additive = key == "loss" or key in run.criterion.weight_dict
            step_losses[key] += value if additive else value / len(batches)
    return step_losses, _optimizer_step(run)


def _forward_backward(run: Run, images, mask, targets, num_boxes: float, where: str, steps_now: bool):
    """Backpropagate one batch's share of the step's weighted loss (scaled for fp16); returns its losses and
    metrics as floats, ``loss`` being the weighted sum. Non-finite predictions or losses stop the run."""
    config = run.config
    with autocast(run.device, config.amp):
        outputs = _to_float32(run.train_model(images, mask))
    problem, losses, loss = None, {}, None
    if not all(bool(torch.isfinite(outputs[key]).all()) for key in ("pred_logits", "pred_boxes")):
        problem = "the model's predictions"  # the matcher cannot match them
    else:
        losses = run.criterion(outputs, targets, num_boxes, batch_share=1 / config.grad_accum)
        weights = run.criterion.weight_dict
        loss = sum(weights[key] * losses[key] for key in weights)
        if not bool(torch.isfinite(loss)):
            bad = sorted(key for key, value in losses.items() if not bool(torch.isfinite(value).all()))
            problem = f"the loss ({', '.join(bad) or 'the weighted sum'})"
    if distributed.any_process(problem is not None, run.device):
        _stop(run, problem or "another process's batch", where)
    # gradients are averaged across processes only on the batch that steps
    sync = run.ddp.no_sync() if run.ddp is not None and not steps_now else contextlib.nullcontext()
    with sync:
        run.state.scaler.scale(loss).backward()
    return {"loss": float(loss.detach()), **{key: float(value.detach()) for key, value in losses.items()}}


def _optimizer_step(run: Run) -> float:
    """Unscale, clip (``clip_max_norm``; 0 = no clipping), step; returns the gradient norm. Stops the run on
    non-finite gradients (fp16's scaler skips those steps itself) and on weights the step made non-finite,
    before anything is saved."""
    state, max_norm = run.state, run.config.clip_max_norm if run.config.clip_max_norm > 0 else math.inf
    state.scaler.unscale_(state.optimizer)
    grad_norm = clip_grad_norm_(run.model.parameters(), max_norm)
    where = f"step {state.position.step + 1}"
    if distributed.any_process(not state.scaler.is_enabled() and not bool(torch.isfinite(grad_norm)), run.device):
        _stop(run, "the gradients", where)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if distributed.any_process(not _finite_parameters(run.model), run.device):
        _stop(run, "the weights after the optimizer step", where)
    return float(grad_norm)


def _stop(run: Run, what: str, where: str) -> None:
    """Raise :class:`NonFiniteLossError`: ``what`` became NaN or infinite at ``where``; the last good
    checkpoint (:func:`save` writes no other) stays the one to resume from."""
    if run.good_checkpoint is not None:
        kept = f"the last good checkpoint {run.good_checkpoint} (step {run.good_step}) is kept"
        advice = f"Resume from it with --resume {_run_folder(run.good_checkpoint)} and a lower --lr"
    else:
        kept, advice = "no checkpoint had been written yet", "Start again with a lower --lr"
    raise NonFiniteLossError(
        f"{what} became NaN or infinite at {where} (after step {run.state.position.step}); training stopped "
        f"and {kept}. {advice} (or --amp bf16 instead of fp16), or check the annotations."
    )


def _interrupted(run: Run, stop: Stop) -> Interrupted:
    """Ctrl-C or SIGTERM stopped the run: checkpoint the last whole step if it is not yet (rank 0 alone,
    without collectives: the other processes may be gone), and say where the run stopped and how to go on."""
    position = run.state.position
    if not stop.mid_step and position.step > 0 and (run.good_checkpoint is None or position.step > run.good_step):
        save(run, collective=False)
    if position.iteration == 0 and position.epoch > 0:
        where = f"after epoch {position.epoch} (step {position.step})"
    else:
        where = f"in epoch {position.epoch + 1} after batch {position.iteration} of {run.batches.num_batches} "
        where += f"(step {position.step})"
    if run.good_checkpoint is None:
        return Interrupted(f"training stopped by {stop.name} {where}, before any checkpoint was written: run the "
                           "same command again to start over", stop.exit_code)  # fmt: skip
    folder, config = _run_folder(run.good_checkpoint), run.config
    own = run.good_checkpoint == run.output_dir / CHECKPOINT_NAME
    same_command = own and config.resume is None and config.auto_resume  # it resumes from the folder's own
    how = f"run the same command again to resume (or add --resume {folder})" if same_command else (
        f"resume with --resume {folder}"
    )  # fmt: skip
    return Interrupted(
        f"training stopped by {stop.name} {where}; {run.good_checkpoint} holds step {run.good_step}: {how}",
        stop.exit_code,
    )


def _run_folder(checkpoint: Path) -> Path:
    """What ``--resume`` takes for ``checkpoint``: its run folder, or the file itself under another name."""
    return checkpoint.parent if checkpoint.name == CHECKPOINT_NAME else checkpoint


def _log_window(run: Run, window: dict[str, float], steps: int, elapsed: float) -> None:
    means = distributed.all_reduce_mean({key: value / steps for key, value in window.items()}, run.device)
    position = run.state.position
    record = {"epoch": position.epoch + 1, "iteration": position.iteration, "step": position.step}
    for group in run.state.optimizer.param_groups:
        record["lr" if group["name"] == "default" else f"lr_{group['name']}"] = group["lr"]
    record["time_per_iter"] = elapsed / steps
    record.update(sorted(means.items()))
    run.log.write(record, position.step)


def save(run: Run, collective: bool = True) -> None:
    """Checkpoint (rank 0 writes; every process's generator states are gathered into it) a good model: one
    whose weights and statistics are finite and whose outputs, in evaluation mode (as eval and predict run
    it), are finite on the last training batch. Any other stops the run and never replaces the last good
    checkpoint. ``collective=False`` (on Ctrl-C, when the other processes may be gone): rank 0 alone checks
    and writes, with its own generator states.

    Raises:
        NonFiniteLossError: the model is not good.
        OutputError: the checkpoint cannot be written (the disk is full); the previous one stays.
    """
    if not collective and not run.info.is_main:
        return
    step = run.state.position.step
    problem = _model_problem(run)
    if distributed.any_process(problem is not None, run.device) if collective else problem is not None:
        _stop(run, problem or "another process's model", f"the checkpoint of step {step}")
    states = distributed.gather_to_main(rng_state(run.device)) if collective else [rng_state(run.device)]
    if run.info.is_main:
        path = run.output_dir / CHECKPOINT_NAME
        try:
            save_checkpoint(
                path,
                run.model,
                **run.state.state_dict(),
                rng=states,
                sampler={"seed": run.config.seed},
                train_config=train_config_to_dict(run.config),
                **run.checkpoint_extras,
            )
        except OutputError as error:
            good = run.good_checkpoint
            kept = f"{good} (step {run.good_step}) is kept to resume from" if good else "no checkpoint was written"
            raise OutputError(f"{error}; training stopped at step {step} and {kept}") from None
    run.good_checkpoint, run.good_step = run.output_dir / CHECKPOINT_NAME, step
    if collective:
        distributed.barrier()


def _model_problem(run: Run) -> str | None:
    """What keeps the run's model from being checkpointed as good (None: nothing): weights or statistics that
    are not finite, or outputs that are not, in evaluation mode, on the last training batch (a blow-up that
    training mode's batch statistics still hide)."""
    if not all(bool(torch.isfinite(value).all()) for value in run.model.state_dict().values()
               if value.is_floating_point()):  # fmt: skip
        return "the weights"
    if run.last_batch is None:
        return None
    training = run.model.training
    run.model.eval()
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the random token ranking draws at inference
        outputs = run.model(*run.last_batch)
    run.model.train(training)
    if all(bool(torch.isfinite(outputs[key]).all()) for key in ("pred_logits", "pred_boxes")):
        return None
    return "the model's outputs in evaluation mode"


def evaluate_epoch(run: Run, epochs_done: int, skip_if_done: bool = False) -> dict[str, float]:
    """Evaluate after ``epochs_done`` epochs into ``eval_epoch{N}.json``; the training generators are left
    untouched (the random token ranking draws at inference too)."""
    result = run.output_dir / f"eval_epoch{epochs_done}.json"
    if skip_if_done and result.is_file():
        return read_metrics(result)
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        metrics = evaluate(
            run.model, run.val_loader, run.val_set.coco, run.label_to_category_id, run.device,
            run.output_dir / f"detections_epoch{epochs_done}.json",
        )  # fmt: skip
    if run.info.is_main:
        atomic_write_text(result, metrics_json(metrics, epoch=epochs_done))
        run.log.write({"epoch": epochs_done, **{f"eval_{key}": value for key, value in metrics.items()}},
                      run.state.position.step, "eval")  # fmt: skip
        run.progress.message(f"epoch {epochs_done}: AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}")
    return metrics


def _warn_boxes_beyond_queries(train_set, num_queries: int) -> None:
    """Warn (once, with the count) when training images hold more boxes than the model has queries: the
    matcher pairs each query with one box, so the boxes beyond ``num_queries`` in an image are never learned.
    Counted from the annotations of CocoDetection-like sets (``coco`` and ``ids``), before training."""
    coco, ids = getattr(train_set, "coco", None), getattr(train_set, "ids", None)
    if coco is None or ids is None:
        return
    counts = [sum(not ann.get("iscrowd", 0) for ann in coco.imgToAnns.get(image_id, [])) for image_id in ids]
    over = [count for count in counts if count > num_queries]
    if over:
        warnings.warn(
            f"{len(over)} of {len(counts)} training images have more boxes than the model's {num_queries} queries "
            f"(up to {max(over)}): only {num_queries} boxes of an image can be matched and the rest are never "
            "learned; raise model.num_queries (--set model.num_queries=N)",
            stacklevel=3,
        )


def _data_source(train_set, val_set) -> DataSource:
    """Where CocoDetection-like sets read from (an empty source for other datasets)."""
    try:
        return DataSource(
            train_images=str(train_set.images_dir),
            train_ann=str(train_set.annotations_file),
            val_images=str(val_set.images_dir),
            val_ann=str(val_set.annotations_file),
        )
    except AttributeError:
        return DataSource()


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


def _to_device(batch, device: torch.device):
    images, mask, targets = batch
    targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def _step_num_boxes(step_targets: list[list[dict[str, torch.Tensor]]], device: torch.device) -> float:
    """Target boxes of one optimizer step (over its batches, averaged over processes), at least 1."""
    count = sum(len(target["labels"]) for targets in step_targets for target in targets)
    return max(distributed.all_reduce_mean({"boxes": float(count)}, device)["boxes"], 1.0)


def _finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def _to_float32(outputs):
    """Half-precision tensors of the model outputs in float32 (the losses and matching run in float32)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs
