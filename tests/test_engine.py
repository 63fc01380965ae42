"""Training engine: optimizer groups and schedule, data order, tiny end-to-end runs, resume, divergence."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sparse_detr.checkpoint import read_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.engine import (
    METRIC_KEYS,
    NonFiniteLossError,
    TrainConfig,
    build_datasets,
    build_optimizer,
    build_scheduler,
    lr_scale,
    train,
    train_config_from_dict,
    train_config_to_dict,
    train_recipe,
    train_step,
)
from sparse_detr.engine import setup as engine_setup
from sparse_detr.engine import step as step_module
from sparse_detr.engine.initialization import InitialWeights
from sparse_detr.engine.logging import Progress
from sparse_detr.engine.run_config import read_config_file, resolve_run_config
from sparse_detr.engine.sampling import BlockBatchSampler, EpochBatchSampler, SeededSamples
from sparse_detr.engine.state import find_resume_path, rng_state, set_rng_state
from sparse_detr.models import build_criterion, build_model
from sparse_detr.zoo import load_model, resolve_checkpoint

IMAGE_SIZE = 96  # the smallest training scale still gives the tiny preset more tokens than queries


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=4, num_val=2, image_size=IMAGE_SIZE)
    return build_datasets(*synthetic_splits(root), image_size=IMAGE_SIZE)


def tiny_train_config(output_dir, **changes) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=2,
        workers=0,
        image_size=IMAGE_SIZE,
        iters_per_epoch=2,
        eval_every_epochs=2,
        output_dir=str(output_dir),
        log_every=1,
        seed=3,
    )
    return TrainConfig(**{**base, **changes})


def test_param_groups_and_learning_rates():
    # one-stage: the decoder has a reference_points projection
    model = build_model(apply_overrides(get_preset("tiny"), {"model.two_stage": False}))
    config = TrainConfig(batch_size=4)  # total 4 images: lr x sqrt(4 / 16) = x0.5
    optimizer = build_optimizer(model, config)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["default"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW)

    names = {id(p): n for n, p in model.named_parameters()}
    group_names = {name: [names[id(p)] for p in group["params"]] for name, group in groups.items()}
    assert all(n.startswith("backbone.0.") for n in group_names["backbone"])
    assert all("sampling_offsets" in n or "reference_points" in n for n in group_names["linear_proj"])
    assert any("reference_points" in n for n in group_names["linear_proj"])
    assert not any(n.startswith("backbone.0.") for n in group_names["default"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(sum(group_names.values(), [])) == sorted(trainable)


def test_lr_scale_and_drop():
    assert lr_scale(TrainConfig(batch_size=2), world_size=8) == pytest.approx(1.0)
    assert lr_scale(TrainConfig(batch_size=4, grad_accum=2), world_size=8) == pytest.approx(2.0)
    assert lr_scale(TrainConfig(batch_size=4, scale_lr=False)) == 1.0

    config = TrainConfig(batch_size=16)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(config.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:40] == [pytest.approx(2e-4)] * 40
    assert lrs[40:] == [pytest.approx(2e-5)] * 10


def test_train_config_checks_and_round_trip():
    config = TrainConfig(amp="bf16", grad_accum=2, output_dir="runs/x")
    assert train_config_from_dict(json.loads(json.dumps(train_config_to_dict(config)))) == config
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(KeyError, match="unknown train config"):
        train_config_from_dict({"learning_rate": 1.0})


def test_train_recipes():
    paper = train_recipe("sparse-rho0.1")
    assert (paper.epochs, paper.lr_drop, paper.lr, paper.lr_backbone) == (50, 40, 2e-4, 2e-5)
    assert paper.output_dir == "runs/sparse-rho0.1"
    tiny = train_recipe("tiny")
    assert tiny.image_size < 800 and tiny.lr_backbone == tiny.lr  # a from-scratch backbone
    assert train_recipe("tiny", batch_size=2).batch_size == 2
    # the drop stays at the same fraction of a shorter or longer run, unless given
    assert train_recipe("sparse-rho0.1", epochs=10).lr_drop == 8
    assert train_recipe("sparse-rho0.1", epochs=10, lr_drop=3).lr_drop == 3
    with pytest.raises(TypeError):
        train_recipe("tiny", learning_rate=1.0)


class _Noise(Dataset):
    """A random draw per item: shows which generator state the sample was made with."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([float(index)]), torch.rand(1)


def _epoch(sampler, epoch, skip=0, workers=0):
    sampler.set_epoch(epoch, skip)
    loader = DataLoader(
        SeededSamples(_Noise()), batch_sampler=sampler, num_workers=workers, generator=torch.Generator()
    )
    return [(x.flatten().tolist(), y.flatten().tolist()) for x, y in loader]


def test_data_order_is_seeded_resumable_and_worker_independent():
    sampler = EpochBatchSampler(_Noise(), batch_size=3, seed=0)
    assert sampler.num_batches == 3  # the incomplete batch is dropped
    first = _epoch(sampler, 0)
    assert first == _epoch(EpochBatchSampler(_Noise(), batch_size=3, seed=0), 0)
    assert first != _epoch(sampler, 1)
    assert _epoch(sampler, 0, skip=2) == first[2:]
    assert _epoch(sampler, 0, workers=2) == first

    before = torch.get_rng_state()
    _epoch(sampler, 0)
    assert torch.equal(torch.get_rng_state(), before)  # augmentation leaves dropout's generator alone

    halves = [EpochBatchSampler(_Noise(), 1, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [i for half in halves for batch in _epoch(half, 0) for i in batch[0]]
    assert sorted(seen) == list(map(float, range(10)))
    with pytest.raises(ValueError, match="does not fill"):
        EpochBatchSampler(_Noise(), batch_size=4, seed=0, multiple_of=3)


@pytest.mark.slow
def test_tiny_end_to_end(datasets, tmp_path):
    train_set, val_set = datasets
    config = tiny_train_config(tmp_path / "run", epochs=1, checkpoint_every_iters=1)
    metrics = train(get_preset("tiny"), config, train_set, val_set)

    assert set(metrics) == set(METRIC_KEYS)
    assert all(math.isnan(v) or 0 <= v <= 1 for v in metrics.values())
    out = tmp_path / "run"
    final = json.loads((out / "metrics_final.json").read_text())
    assert list(final) == [*METRIC_KEYS, "images_skipped", "skipped_image_ids", "per_class"]
    assert [entry["name"] for entry in final["per_class"]] == list(val_set.category_names.values())
    assert final["images_skipped"] == 0 and final["skipped_image_ids"] == []
    assert json.loads((out / "eval_epoch1.json").read_text())["epoch"] == 1
    detections = json.loads((out / "detections_epoch1.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    stored = resolve_run_config(read_config_file(out / "config.toml"))  # what --config reads back
    assert stored.config.model.num_classes == train_set.num_classes and stored.preset == "tiny"
    assert stored.train == config
    assert stored.data.val_ann == str(val_set.annotations_file)
    assert json.loads((out / "initial_weights.json").read_text()) == {"backbone": None}  # tiny: from scratch

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert {"loss", "lr", "lr_backbone", "lr_linear_proj", "time_per_iter", "dam_coverage", "loss_ce"} <= set(
        train_records[0]
    )

    checkpoint = read_checkpoint(out / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["step"]) == (1, 0, 2)
    assert {"optimizer", "lr_scheduler", "scaler", "rng", "train_config", "sampler"} <= set(checkpoint)
    assert checkpoint["initial_weights"] == {"backbone": None}
    assert load_model(out / "checkpoint.pth").config.model.num_classes == train_set.num_classes

    # a finished run is not trained again
    assert train(get_preset("tiny"), config, train_set, val_set) == pytest.approx(metrics, nan_ok=True)


@pytest.mark.slow
def test_best_checkpoint_keeps_the_weights_of_the_best_validation_ap(datasets, tmp_path, monkeypatch):
    """checkpoint_best.pth holds the weights of the epoch with the highest AP (a tie keeps the earlier, NaN
    never wins); a run folder means it, --last means checkpoint.pth."""
    from sparse_detr.engine import trainer
    from sparse_detr.engine.evaluate import Metrics

    train_set, val_set = datasets
    aps, weights = iter([0.2, 0.5, 0.5, math.nan]), []

    def scripted_evaluate(model, *args, **kwargs):
        weights.append({key: value.clone() for key, value in model.state_dict().items()})
        return Metrics(dict.fromkeys(METRIC_KEYS, 0.0) | {"AP": next(aps)})

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    config = tiny_train_config(tmp_path / "run", epochs=4, iters_per_epoch=1, eval_every_epochs=1)
    train(get_preset("tiny"), config, train_set, val_set)

    out = tmp_path / "run"
    best = read_checkpoint(out / "checkpoint_best.pth")
    assert best["best"] == {"epoch": 2, "AP": 0.5}
    assert "optimizer" not in best and best["train_config"]["image_size"] == IMAGE_SIZE  # weights only
    assert all(torch.equal(best["model"][key], value) for key, value in weights[1].items())
    assert not all(torch.equal(best["model"][key], value) for key, value in weights[3].items())
    assert resolve_checkpoint(out) == out / "checkpoint_best.pth"
    assert resolve_checkpoint(out, last=True) == out / "checkpoint.pth"
    assert find_resume_path(out, str(out), auto_resume=False) == out / "checkpoint.pth"  # --resume: the last


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(datasets, tmp_path, monkeypatch):
    train_set, val_set = datasets
    model_config = get_preset("tiny")
    train(model_config, tiny_train_config(tmp_path / "whole"), train_set, val_set)

    # die inside the 4th optimizer step: the last checkpoint is mid-epoch 2 (after step 3)
    real_clip, calls = step_module.clip_grad_norm_, []

    def crashing_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise _Crash
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(step_module, "clip_grad_norm_", crashing_clip)
    config = tiny_train_config(tmp_path / "killed", checkpoint_every_iters=1)
    with pytest.raises(_Crash):
        train(model_config, config, train_set, val_set)
    position = read_checkpoint(tmp_path / "killed" / "checkpoint.pth")
    assert (position["epoch"], position["iteration"], position["step"]) == (1, 1, 3)
    monkeypatch.setattr(step_module, "clip_grad_norm_", real_clip)
    train(model_config, config, train_set, val_set)  # resumes from the folder's checkpoint

    whole = read_checkpoint(tmp_path / "whole" / "checkpoint.pth")
    resumed = read_checkpoint(tmp_path / "killed" / "checkpoint.pth")
    assert resumed["step"] == whole["step"] == 4
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "killed" / "metrics_final.json").read_text()) == json.loads(
        (tmp_path / "whole" / "metrics_final.json").read_text()
    )


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_checkpoint(datasets, tmp_path, monkeypatch):
    train_set, val_set = datasets
    real_build = engine_setup.build_criterion

    def diverging_criterion(config):
        criterion, calls = real_build(config), []
        forward = criterion.forward

        def poisoned(outputs, targets, *args, **kwargs):
            losses = forward(outputs, targets, *args, **kwargs)
            calls.append(1)
            if len(calls) == 3:  # first batch of epoch 2
                losses["loss_giou"] = losses["loss_giou"] * math.nan
            return losses

        criterion.forward = poisoned
        return criterion

    monkeypatch.setattr(engine_setup, "build_criterion", diverging_criterion)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss_giou.*last good checkpoint"):
        train(get_preset("tiny"), tiny_train_config(out), train_set, val_set)
    checkpoint = read_checkpoint(out / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert not (out / "metrics_final.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_mixed_precision_and_accumulation_steps(datasets, tmp_path, amp):
    train_set, val_set = datasets
    config = tiny_train_config(
        tmp_path / amp, epochs=1, batch_size=1, grad_accum=2, iters_per_epoch=2, amp=amp, eval_every_epochs=1
    )
    metrics = train(get_preset("tiny"), config, train_set, val_set)
    assert set(metrics) == set(METRIC_KEYS)
    checkpoint = read_checkpoint(tmp_path / amp / "checkpoint.pth")
    assert checkpoint["step"] == 1  # two batches, one optimizer step
    assert checkpoint["scaler"] == {} if amp == "bf16" else checkpoint["scaler"]["scale"] > 0


@pytest.mark.slow
def test_resume_refuses_another_architecture(datasets, tmp_path):
    train_set, val_set = datasets
    config = tiny_train_config(tmp_path / "run", epochs=1, iters_per_epoch=2)
    train(get_preset("tiny"), config, train_set, val_set)
    other = get_preset("tiny")
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, num_queries=20))
    with pytest.raises(ValueError, match="num_queries"):
        train(other, dataclasses.replace(config, epochs=2), train_set, val_set)


class _SameSizeImages(Dataset):
    """Eight 96x96 noise images with 1..8 boxes: batches need no padding, so a batch of 4 and two of 2
    see the same pixels."""

    num_classes = 3
    label_to_category_id = {1: 1, 2: 2}
    category_names = {1: "a", 2: "b"}

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        count = index + 1
        boxes = torch.rand(count, 4, generator=generator) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])
        labels = torch.arange(count) % 2 + 1
        target = {"labels": labels, "boxes": boxes, "image_id": torch.tensor(index)}
        return torch.randn(3, 96, 96, generator=generator), target


def _one_step(max_norm: float) -> dict[str, torch.Tensor]:
    """A tiny model's weights after one :func:`train_step` on a fixed batch, clipping at ``max_norm``."""
    torch.manual_seed(0)
    config = get_preset("tiny")
    model, criterion = build_model(config).train(), build_criterion(config)
    optimizer = build_optimizer(model, train_recipe("tiny"))
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}]
    batch = (images, torch.zeros(1, 64, 64, dtype=torch.bool), targets)
    result = train_step(model, criterion, [batch], optimizer, torch.amp.GradScaler("cpu", enabled=False),
                        torch.device("cpu"), max_norm)  # fmt: skip
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0 and math.isfinite(result.losses["loss"])
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def test_clip_max_norm_zero_means_no_clipping():
    """``clip_max_norm = 0`` is "no clipping" in every caller of the one step (the step benchmark's copy once
    zeroed every gradient with it): the step equals one with an unreachable norm and moves the weights."""
    torch.manual_seed(0)
    before = {name: value.detach().clone() for name, value in build_model(get_preset("tiny")).named_parameters()}
    unclipped, never_reached = _one_step(0.0), _one_step(1e12)
    assert any(not torch.equal(before[name], value) for name, value in unclipped.items())
    for name, value in unclipped.items():
        torch.testing.assert_close(value, never_reached[name], rtol=0, atol=0, msg=name)


def test_train_one_epoch_takes_what_it_uses():
    """An epoch runs from a model, its loss, a loader, the optimizer state and a recipe alone (no run folder,
    no logs): a step per two batches, the position moved on, finite losses."""
    from sparse_detr.data import collate
    from sparse_detr.engine.state import TrainingState
    from sparse_detr.engine.trainer import train_one_epoch

    torch.manual_seed(0)
    config = apply_overrides(get_preset("tiny"), {"model.backbone_norm": "frozen_bn"})
    model, criterion = build_model(config), build_criterion(config)
    recipe = train_recipe("tiny", batch_size=2, grad_accum=2, iters_per_epoch=4)
    optimizer = build_optimizer(model, recipe)
    state = TrainingState(optimizer, build_scheduler(optimizer, recipe), torch.amp.GradScaler("cpu", enabled=False))
    sampler = EpochBatchSampler(_SameSizeImages(), 2, seed=3, max_batches=4, multiple_of=2)
    loader = DataLoader(SeededSamples(_SameSizeImages()), batch_sampler=sampler, collate_fn=collate)
    steps = list(train_one_epoch(model, criterion, loader, state, recipe, torch.device("cpu"), epoch=0))
    assert [done.iteration for done in steps] == [2, 4]
    assert (state.position.epoch, state.position.iteration, state.position.step) == (0, 4, 2)
    assert all(math.isfinite(done.result.losses["loss"]) for done in steps)


class _FirstStep(Exception):
    pass


def _first_step_gradients(tmp_path, monkeypatch, batch_size: int, grad_accum: int) -> dict[str, torch.Tensor]:
    """The gradients the first optimizer step of a tiny model (frozen BatchNorm: nothing depends on the
    batch) would apply."""
    captured = {}

    def capture(model, *args):
        captured.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        raise _FirstStep

    monkeypatch.setattr(step_module, "_optimizer_step", capture)
    config = apply_overrides(get_preset("tiny"), {"model.backbone_norm": "frozen_bn"})
    train_config = tiny_train_config(tmp_path / f"b{batch_size}x{grad_accum}", batch_size=batch_size,
                                     grad_accum=grad_accum, iters_per_epoch=grad_accum)  # fmt: skip
    with pytest.raises(_FirstStep):
        train(config, train_config, _SameSizeImages(), _SameSizeImages(), InitialWeights())
    return captured


@pytest.mark.slow
def test_accumulated_batches_give_the_gradients_of_one_large_batch(tmp_path, monkeypatch):
    """Each batch's losses are normalized by the box count of the whole step (and per-token means by its
    share of the images), so batch 4 and batch 2 x accumulation 2 give the same gradients."""
    sampler = EpochBatchSampler(_SameSizeImages(), batch_size=2, seed=3)
    first, second = (sum(index + 1 for index, _ in batch) for batch in list(sampler)[:2])
    assert first != second  # batches with other box counts: a per-batch normalization would differ
    whole = _first_step_gradients(tmp_path, monkeypatch, batch_size=4, grad_accum=1)
    accumulated = _first_step_gradients(tmp_path, monkeypatch, batch_size=2, grad_accum=2)
    assert whole.keys() == accumulated.keys() and len(whole) > 100
    for name, gradient in whole.items():
        error = (accumulated[name] - gradient).abs().max()
        assert error <= 1e-5 * gradient.abs().max() + 1e-9, name


@pytest.mark.parametrize("size, world_size", [(5, 2), (8, 3), (1, 2), (0, 2), (7, 1)])
def test_evaluation_batches_are_split_into_contiguous_blocks(size, world_size):
    batch_size = 2
    single = list(BlockBatchSampler(size, batch_size))
    assert single == [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)]
    shards = [list(BlockBatchSampler(size, batch_size, rank, world_size)) for rank in range(world_size)]
    assert [batch for shard in shards for batch in shard] == single  # the same batches, in order, once each
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.slow
def test_tensorboard_mirrors_the_metrics(datasets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_set, val_set = datasets
    train(get_preset("tiny"), tiny_train_config(tmp_path, epochs=1, tensorboard=True), train_set, val_set)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/lr", "train/dam_coverage", "eval/AP"} <= scalars


def test_tensorboard_missing_is_one_line(monkeypatch, tmp_path):
    from sparse_detr.engine.logging import MetricsLog
    from sparse_detr.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"^--tensorboard needs the tensorboard package: pip install"):
        MetricsLog(tmp_path, tensorboard=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_on_a_terminal_and_lines_otherwise(tty, caplog):
    caplog.set_level(logging.INFO, logger="sparse_detr")
    stream = _Terminal() if tty else io.StringIO()
    progress = Progress(log_every=2, stream=stream)
    progress.start_epoch(0, 3, total=4)
    for done in range(1, 5):
        progress.update(done, loss=1.5, lr=2e-4)
    progress.end_epoch()
    text = stream.getvalue() if tty else caplog.text
    assert "loss 1.5000" in text and "it/s" in text
    if tty:
        assert "4/4" in text and not caplog.records  # the bar instead of the lines
    else:
        assert [record.getMessage().split("]")[0] for record in caplog.records] == ["epoch 1/3 [2/4", "epoch 1/3 [4/4"]
        assert "eta" in text


def test_progress_is_silent_when_the_logger_hides_info(caplog):
    """``sdetr --quiet`` (the sparse_detr logger at WARNING): no bar, no lines, even on a terminal."""
    caplog.set_level(logging.WARNING, logger="sparse_detr")
    stream = _Terminal()
    progress = Progress(log_every=1, stream=stream)
    progress.start_epoch(0, 1, total=2)
    progress.update(1, loss=1.5, lr=2e-4)
    progress.message("resumed from somewhere")
    progress.end_epoch()
    assert stream.getvalue() == "" and not caplog.records


def test_generator_states_survive_a_safe_checkpoint_load(tmp_path):
    device = torch.device("cpu")
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = rng_state(device)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": [state]}, tmp_path / "rng.pth")
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"][0], device)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_resume_paths(tmp_path):
    assert find_resume_path(tmp_path, None, auto_resume=True) is None
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert find_resume_path(tmp_path, None, auto_resume=True) == tmp_path / "checkpoint.pth"
    assert find_resume_path(tmp_path, None, auto_resume=False) is None
    assert find_resume_path("elsewhere", str(tmp_path), auto_resume=False) == tmp_path / "checkpoint.pth"
    with pytest.raises(FileNotFoundError, match="--resume"):
        find_resume_path(tmp_path, str(tmp_path / "missing.pth"), auto_resume=True)
