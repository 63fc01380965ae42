"""The training loop: AdamW on the weighted losses of SPEC §6, checkpoints, resume, evaluation, reports.

:func:`train` runs the same way in one process and under ``torchrun`` (one process per device, gloo on
CPUs, NCCL on GPUs); only rank 0 writes to the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_
from torch.utils.data import DataLoader

from sparse_detr.checkpoint import category_differences, read_checkpoint, save_checkpoint, stored_categories
from sparse_detr.config import Config, config_from_dict, config_to_dict
from sparse_detr.data.source import DataSource
from sparse_detr.engine import distributed
from sparse_detr.engine.checkpointing import CHECKPOINT_NAME, Position, find_resume_path, rng_state, set_rng_state
from sparse_detr.engine.evaluate import METRIC_KEYS, build_eval_loader, evaluate, format_metrics, metrics_json
from sparse_detr.engine.initialization import InitialWeights, init_from_checkpoint, resolve_initial_weights
from sparse_detr.engine.logging import MetricsLog, Progress, require_tensorboard
from sparse_detr.engine.optim import build_optimizer, build_scheduler
from sparse_detr.engine.run_config import CONFIG_FILE_NAME, RunConfig
from sparse_detr.engine.sampling import EpochBatchSampler, SeededSamples
from sparse_detr.engine.train_config import TrainConfig, train_config_to_dict
from sparse_detr.errors import ConfigError, NonFiniteError, UsageError
from sparse_detr.models import build_criterion, build_model
from sparse_detr.utils.io import atomic_write_text, check_writable, remove_temporaries

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite; the run stopped without overwriting its last checkpoint."""


def build_datasets(train_images, train_ann, val_images, val_ann, image_size: int = 800):
    """Training (augmented, SPEC §6) and evaluation ``CocoDetection`` sets at ``image_size``
    (the evaluation shorter side; training sizes are the COCO recipe scaled by ``image_size / 800``)."""
    from sparse_detr.data import CocoDetection, build_transforms, scaled_sizes

    sizes = scaled_sizes(image_size)._asdict()
    train_set = CocoDetection(train_images, train_ann, build_transforms(True, **sizes), train=True)
    val_set = CocoDetection(val_images, val_ann, build_transforms(False, **sizes))
    return train_set, val_set


def train(
    model_config: Config,
    train_config: TrainConfig,
    train_set,
    val_set,
    initial_weights: InitialWeights | None = None,
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
    folder's own checkpoint. Raises :class:`NonFiniteLossError` if the loss diverges.
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
    resume_path = find_resume_path(train_config.output_dir, train_config.resume, train_config.auto_resume)
    if resume_path is None and initial_weights is None:
        initial_weights = distributed.main_first(lambda: resolve_initial_weights(model_config, train_config.init))
    run = _Run(model_config, train_config, train_set, val_set, info, progress, resume_path, initial_weights)
    try:
        return run.fit()
    finally:
        run.log.close()


class _Run:
    """State of one training run: model, optimizer, data, position and reports."""

    def __init__(
        self,
        model_config: Config,
        config: TrainConfig,
        train_set,
        val_set,
        info,
        progress: Progress,
        resume_path: Path | None,
        initial_weights: InitialWeights | None,
    ):
        self.config, self.info, self.progress = config, info, progress
        self.device = info.device
        self.output_dir = Path(config.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.val_set = val_set
        self.label_to_category_id = train_set.label_to_category_id
        # label -> (COCO category id, name): lets predict/visualize name the classes of a checkpoint
        self.categories = {
            label: {"id": int(cid), "name": train_set.category_names[label]}
            for label, cid in train_set.label_to_category_id.items()
        }
        checkpoint = read_checkpoint(resume_path) if resume_path else None
        if checkpoint is not None:
            _check_same_model(checkpoint["config"], model_config, resume_path)
            if not config.allow_other_categories:
                _check_same_categories(checkpoint, train_set.category_names, resume_path)
            self.initial_weights = checkpoint.get("initial_weights")
        else:
            self.initial_weights = initial_weights.to_dict()

        torch.manual_seed(config.seed + info.rank)
        backbone_weights = initial_weights.backbone if checkpoint is None else None
        self.model = build_model(model_config, backbone_weights).to(self.device)
        if checkpoint is None and initial_weights.checkpoint is not None:
            init = initial_weights.checkpoint
            report = init_from_checkpoint(self.model, init.file, train_set.category_names)
            for line in report.lines(f"{init.source} ({init.file}, sha256 {init.sha256[:12]})"):
                progress.message(line)
        self.criterion = build_criterion(model_config).to(self.device)
        self.optimizer = build_optimizer(self.model, config, info.world_size)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.position = Position()
        if checkpoint is not None:
            self._restore(checkpoint, resume_path)
        self.ddp = None
        if info.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=config.find_unused_parameters
            )

        self.batches = EpochBatchSampler(
            train_set,
            config.batch_size,
            config.seed,
            info.rank,
            info.world_size,
            config.iters_per_epoch,
            config.grad_accum,
        )
        from sparse_detr.data import collate

        self.train_loader = DataLoader(
            SeededSamples(train_set),
            batch_sampler=self.batches,
            num_workers=config.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=config.workers > 0,
            # the loader's own seed draw must not consume the global generator (dropout's)
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.val_loader = build_eval_loader(val_set, config.batch_size_eval, config.workers)
        if info.is_main:
            for leftover in remove_temporaries(self.output_dir):  # from writes a killed run left halfway
                progress.message(f"removed {leftover}, a file a killed write left")
        self.log = MetricsLog(self.output_dir, info.is_main, config.tensorboard)
        if info.is_main:
            run_config = RunConfig(model_config, config, _data_source(train_set, val_set))
            atomic_write_text(self.output_dir / CONFIG_FILE_NAME, run_config.to_toml())
            atomic_write_text(self.output_dir / "initial_weights.json", json.dumps(self.initial_weights, indent=2))

    def _restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        self.model.load_state_dict(checkpoint["model"])
        configured = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        self._adopt_learning_rates(configured)
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.position = Position(checkpoint["epoch"], checkpoint["iteration"], checkpoint["step"])
        states = checkpoint.get("rng") or []
        if len(states) == self.info.world_size:
            set_rng_state(states[self.info.rank], self.device)
        else:  # another number of processes: a fresh but reproducible draw
            torch.manual_seed(self.config.seed + self.info.rank + self.position.step)
        self.progress.message(
            f"resumed from {path}: epoch {self.position.epoch + 1}, batch {self.position.iteration}, "
            f"step {self.position.step}"
        )

    def _adopt_learning_rates(self, configured: list[float]) -> None:
        """Resumed with other learning rates (say, lower ones after a divergence): each group starts again
        from its configured rate, at the point of the schedule the run had reached."""
        changed = []
        for group, rate in zip(self.optimizer.param_groups, configured):
            if not math.isclose(group["initial_lr"], rate):
                changed.append(f"{group['name']} {group['initial_lr']:.3g} -> {rate:.3g}")
                group["lr"] *= rate / group["initial_lr"]
                group["initial_lr"] = rate
        if changed:
            self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
            self.progress.message(f"learning rates changed on resume: {', '.join(changed)}")

    @property
    def train_model(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def fit(self) -> dict[str, float]:
        config, position = self.config, self.position
        final = self.output_dir / "metrics_final.json"
        if position.epoch >= config.epochs and final.is_file():
            metrics = json.loads(final.read_text())
            self.progress.message(f"{self.output_dir} already finished {config.epochs} epochs")
            return {k: math.nan if v is None else v for k, v in metrics.items()}
        metrics = None
        if position.iteration == 0 and position.epoch > 0 and self._eval_due(position.epoch):
            metrics = self._evaluate_epoch(position.epoch, skip_if_done=True)
        for epoch in range(position.epoch, config.epochs):
            self._train_epoch(epoch)
            self.scheduler.step()
            self.position = Position(epoch + 1, 0, self.position.step)
            distributed.average_buffers(self.model)
            self._save()
            if self._eval_due(epoch + 1):
                metrics = self._evaluate_epoch(epoch + 1)
        if metrics is None:
            metrics = self._evaluate_epoch(config.epochs)
        if self.info.is_main:
            atomic_write_text(final, metrics_json(metrics))
            self.progress.message(format_metrics(metrics))
        distributed.barrier()
        return metrics

    def _eval_due(self, epochs_done: int) -> bool:
        return epochs_done % self.config.eval_every_epochs == 0 or epochs_done == self.config.epochs

    def _train_epoch(self, epoch: int) -> None:
        """One epoch from the current position: each optimizer step accumulates ``grad_accum`` batches."""
        config = self.config
        skip = self.position.iteration if epoch == self.position.epoch else 0
        self.batches.set_epoch(epoch, skip)
        self.train_model.train()
        self.progress.start_epoch(epoch, config.epochs, self.batches.num_batches, skip)
        window: dict[str, float] = defaultdict(float)
        window_steps, tic = 0, time.perf_counter()
        data_tic = tic
        for first, group in _step_groups(enumerate(self.train_loader, start=skip), config.grad_accum):
            window["data_time"] += time.perf_counter() - data_tic
            group = [self._to_device(batch) for batch in group]
            num_boxes = _accumulated_num_boxes([targets for _, _, targets in group], self.device)
            step_losses: dict[str, float] = defaultdict(float)
            for index, (images, mask, targets) in enumerate(group):
                last = index == len(group) - 1
                losses = self._forward_backward(images, mask, targets, num_boxes, epoch, first + index, last)
                for key, value in losses.items():
                    # the batches' losses add up to the step's; log-only metrics are averaged
                    additive = key == "loss" or key in self.criterion.weight_dict
                    step_losses[key] += value if additive else value / len(group)
            for key, value in step_losses.items():
                window[key] += value
            window["grad_norm"] += self._optimizer_step()
            window_steps += 1
            iteration = first + len(group)
            self.position = Position(epoch, iteration, self.position.step + 1)
            lr = self.optimizer.param_groups[0]["lr"]
            self.progress.update(iteration, step_losses["loss"], lr)
            if self.position.step % config.log_every == 0 or iteration == self.batches.num_batches:
                self._log_window(window, window_steps, time.perf_counter() - tic)
                window, window_steps, tic = defaultdict(float), 0, time.perf_counter()
            every = config.checkpoint_every_iters
            if every and self.position.step % every == 0 and iteration < self.batches.num_batches:
                self._save()
            data_tic = time.perf_counter()
        self.progress.end_epoch()

    def _to_device(self, batch):
        images, mask, targets = batch
        device = self.device
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets

    def _forward_backward(
        self, images, mask, targets, num_boxes: float, epoch: int, iteration: int, steps_now: bool
    ) -> dict[str, float]:
        """Backpropagate one batch's share of the step's weighted loss (scaled for fp16); returns its
        losses and metrics as floats, ``loss`` being the weighted sum.

        ``num_boxes`` counts the target boxes of the whole step (all its batches, averaged over processes),
        so that the batches' losses add up to the loss of one large batch.
        """
        amp = self.config.amp
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp is not None):
            outputs = _to_float32(self.train_model(images, mask))
        problem, losses, loss = None, {}, None
        if not all(bool(torch.isfinite(outputs[key]).all()) for key in ("pred_logits", "pred_boxes")):
            problem = "the model's predictions"  # the matcher cannot match them
        else:
            losses = self.criterion(outputs, targets, num_boxes, batch_share=1 / self.config.grad_accum)
            weights = self.criterion.weight_dict
            loss = sum(weights[k] * losses[k] for k in weights)
            if not bool(torch.isfinite(loss)):
                bad = sorted(k for k, v in losses.items() if not bool(torch.isfinite(v).all()))
                problem = f"the loss ({', '.join(bad) or 'the weighted sum'})"
        if distributed.any_process(problem is not None, self.device):
            self._stop(problem or "another process's batch", f"epoch {epoch + 1}, batch {iteration + 1}")
        # gradients are averaged across processes only on the batch that steps
        sync = self.ddp.no_sync() if self.ddp is not None and not steps_now else contextlib.nullcontext()
        with sync:
            self.scaler.scale(loss).backward()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}

    def _optimizer_step(self) -> float:
        """Unscale, clip (``clip_max_norm``; 0 = no clipping), step; returns the gradient norm. Stops the
        run on non-finite gradients (fp16's scaler skips those steps itself) and on weights the step made
        non-finite, before anything is saved."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip_max_norm if self.config.clip_max_norm > 0 else math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm)
        where = f"step {self.position.step + 1}"
        if distributed.any_process(not self.scaler.is_enabled() and not bool(torch.isfinite(grad_norm)), self.device):
            self._stop("the gradients", where)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if distributed.any_process(not _finite_parameters(self.model), self.device):
            self._stop("the weights after the optimizer step", where)
        return float(grad_norm)

    def _stop(self, what: str, where: str) -> None:
        """Raise :class:`NonFiniteLossError`: ``what`` became NaN or infinite at ``where``; the last
        checkpoint, written before, is good and stays the one ``--resume`` takes."""
        if self.checkpoint_path.is_file():
            kept = f"the last good checkpoint {self.checkpoint_path} (step {self.position.step}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"{what} became NaN or infinite at {where} (after step {self.position.step}); training stopped "
            f"and {kept}. Resume with a lower --lr (or --amp bf16 instead of fp16), or check the annotations."
        )

    def _log_window(self, window: dict[str, float], steps: int, elapsed: float) -> None:
        means = {k: v / steps for k, v in window.items()}
        means = distributed.all_reduce_mean(means, self.device)
        record = {"epoch": self.position.epoch + 1, "iteration": self.position.iteration, "step": self.position.step}
        for group in self.optimizer.param_groups:
            record["lr" if group["name"] == "default" else f"lr_{group['name']}"] = group["lr"]
        record["time_per_iter"] = elapsed / steps
        record.update(sorted(means.items()))
        self.log.write(record, self.position.step)

    def _save(self) -> None:
        """Checkpoint (rank 0 writes; every process's generator states are gathered into it); weights that
        are not finite are never written over the last good checkpoint."""
        if not _finite_parameters(self.model):
            self._stop("the weights", f"the checkpoint of step {self.position.step}")
        states = distributed.gather_to_main(rng_state(self.device))
        if self.info.is_main:
            save_checkpoint(
                self.checkpoint_path,
                self.model,
                optimizer=self.optimizer.state_dict(),
                lr_scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                epoch=self.position.epoch,
                iteration=self.position.iteration,
                step=self.position.step,
                rng=states,
                sampler={"seed": self.config.seed},
                train_config=train_config_to_dict(self.config),
                categories=self.categories,
                initial_weights=self.initial_weights,
            )
        distributed.barrier()

    def _evaluate_epoch(self, epochs_done: int, skip_if_done: bool = False) -> dict[str, float]:
        """Evaluate after ``epochs_done`` epochs into ``eval_epoch{N}.json``; the training generators are
        left untouched (the random saliency criterion draws at inference too)."""
        result = self.output_dir / f"eval_epoch{epochs_done}.json"
        if skip_if_done and result.is_file():
            stored = json.loads(result.read_text())
            return {k: math.nan if stored[k] is None else stored[k] for k in METRIC_KEYS}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate(
                self.model,
                self.val_loader,
                self.val_set.coco,
                self.label_to_category_id,
                self.device,
                self.output_dir / f"detections_epoch{epochs_done}.json",
            )
        if self.info.is_main:
            atomic_write_text(result, metrics_json(metrics, epoch=epochs_done))
            record = {"epoch": epochs_done, **{f"eval_{k}": v for k, v in metrics.items()}}
            self.log.write(record, self.position.step, "eval")
            self.progress.message(f"epoch {epochs_done}: AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}")
        return metrics


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


def _step_groups(batches: Iterable[tuple[int, Any]], size: int) -> Iterator[tuple[int, list[Any]]]:
    """``(first iteration, [batch, ...])`` for each run of ``size`` consecutive ``(iteration, batch)``
    pairs: the batches of one optimizer step (the sampler serves whole steps)."""
    group, first = [], 0
    for iteration, batch in batches:
        if not group:
            first = iteration
        group.append(batch)
        if len(group) == size:
            yield first, group
            group = []


def _accumulated_num_boxes(step_targets: list[list[dict[str, torch.Tensor]]], device: torch.device) -> float:
    """Target boxes of one optimizer step (over its batches, averaged over processes), at least 1."""
    count = sum(len(target["labels"]) for targets in step_targets for target in targets)
    return max(distributed.all_reduce_mean({"boxes": float(count)}, device)["boxes"], 1.0)


def _finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())


def check_input_size(model_config: Config, train_config: TrainConfig) -> None:
    """Two-stage models take their queries from the encoder tokens: refuse, before any work, an image size
    whose smallest training scale gives fewer tokens than queries.

    Raises:
        ConfigError: naming the image size to use instead.
    """
    from sparse_detr.data import scaled_sizes

    model = model_config.model
    if not model.two_stage:
        return

    def tokens(image_size: int) -> int:
        side = min(scaled_sizes(image_size).scales)  # every training image's shorter side is at least this
        return sum(math.ceil(side / 2 ** (3 + level)) ** 2 for level in range(model.num_feature_levels))

    if tokens(train_config.image_size) < model.num_queries:
        enough = next(size for size in itertools.count(train_config.image_size) if tokens(size) >= model.num_queries)
        raise ConfigError(
            f"image size {train_config.image_size} gives as few as {tokens(train_config.image_size)} encoder "
            f"tokens at the smallest training scale, fewer than the {model.num_queries} queries: use "
            f"--image-size {enough} or more, or fewer queries (model.num_queries)"
        )


def _check_same_categories(checkpoint: dict[str, Any], names: dict[int, str], path: Path) -> None:
    """A resumed run must train on the categories it started with."""
    stored = stored_categories(checkpoint, config_from_dict(checkpoint["config"]).model.num_classes)
    differences = category_differences(stored, names)
    if differences:
        raise UsageError(
            f"{path} was trained on other categories ({len(differences)} differ; {differences[0]}): "
            "resume on the data it started with, fine-tune it on this data with --init, or pass "
            "--allow-other-categories"
        )


def _to_float32(outputs):
    """Half-precision tensors of the model outputs in float32 (the losses and matching run in float32)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs


def _check_same_model(stored: dict[str, Any], model_config: Config, path: Path) -> None:
    """A resumed checkpoint must hold the architecture and losses being trained."""
    current = config_to_dict(model_config)
    different = [
        f"{section}.{key}"
        for section in ("model", "loss")
        for key in current[section]
        if key != "pretrained_backbone" and stored.get(section, {}).get(key) != current[section][key]
    ]
    if different:
        raise UsageError(
            f"{path} was trained with another configuration ({', '.join(different)} differ); "
            "resume with the same preset and options, or use a new --output-dir"
        )
