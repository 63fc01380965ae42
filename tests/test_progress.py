"""Progress and status lines: the ETA of recent steps, the rate of lines off a terminal, the bar on one,
silence under ``sdetr -q``, and the lines of the long steps (dataset writing, kernel builds, evaluation)."""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import sys

import pytest
import torch

from sparse_detr.ablation.plan import TimeEstimate
from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.engine.logging import Progress
from sparse_detr.models import build_model
from sparse_detr.ops import loader, onnxruntime_library
from sparse_detr.utils import progress
from sparse_detr.utils.progress import RecentRate, format_duration, format_estimate, format_seconds, timed_step, track

WARMUP_STEPS, WARMUP_SLOWDOWN, NOISE = 3, 5.0, 0.2


class FakeClock:
    """A clock the test moves on by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def step_seconds(total: int, seed: int = 0) -> list[float]:
    """An epoch's step times: the first steps several times slower (workers starting, allocator warm-up),
    then one second with ±20 % noise."""
    rng = random.Random(seed)
    return [WARMUP_SLOWDOWN if step < WARMUP_STEPS else 1.0 + rng.uniform(-NOISE, NOISE) for step in range(total)]


def eta_errors(total: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """The relative ETA errors from a tenth of the epoch on, of :class:`RecentRate` and of the rule before it
    (the remaining steps times the mean step time since the start of the epoch)."""
    seconds, clock = step_seconds(total, seed), FakeClock()
    rate, began = RecentRate(clock), clock.now
    recent, since_start = [], []
    for done, duration in enumerate(seconds, 1):
        clock.now += duration
        rate.update(done)
        if done < total / 10 or done == total:
            continue
        truth = sum(seconds[done:])
        recent.append(abs(rate.eta(total - done) - truth) / truth)
        since_start.append(abs((clock.now - began) / done * (total - done) - truth) / truth)
    return recent, since_start


def test_durations_read_as_their_kind():
    assert [format_duration(x) for x in (0.4, 75, 3725, float("nan"))] == ["0:00:00", "0:01:15", "1:02:05", "?"]
    assert [format_seconds(x) for x in (6.24, 75)] == ["6.2 s", "0:01:15"]
    assert [format_estimate(x) for x in (42, 450, 9000, float("inf"))] == ["42 s", "7.5 min", "2.5 h", "?"]


def test_the_ablation_estimate_counts_runs_left(monkeypatch):
    from sparse_detr.ablation import plan

    now = iter([0.0, 0.0, 60.0, 60.0, 150.0])
    monkeypatch.setattr(plan.time, "perf_counter", lambda: next(now))
    estimate = TimeEstimate(runs_to_train=2, epochs_per_run=6)
    assert estimate.first_epoch(20) == ("estimate: first epoch 20 s, so about 4.0 min for 2 runs of 6 epochs, plus "
                                        "measuring each (refined after every run)")  # fmt: skip
    estimate.start_run()
    assert estimate.end_run() == "run took 60 s; 1 run to go, about 60 s left"
    estimate.start_run()
    assert estimate.end_run() == "run took 1.5 min; 0 runs to go, done"


@pytest.mark.parametrize("total", [50, 100, 200])
@pytest.mark.parametrize("seed", [0, 1])
def test_eta_is_within_30_percent_from_a_tenth_of_the_epoch_on(total, seed):
    recent, since_start = eta_errors(total, seed)
    assert max(recent) <= 0.3, max(recent)
    assert since_start[0] > 0.3  # the average since the start: far too long at a tenth of the epoch


def test_eta_of_an_epoch_longer_than_the_window_stays_within_30_percent():
    recent, _ = eta_errors(3000)
    assert max(recent) <= 0.3, max(recent)


def test_training_progress_lines_show_the_recent_eta(library_lines):
    clock = FakeClock()
    bar = Progress(log_every=10, stream=io.StringIO(), clock=clock)
    bar.start_epoch(0, 1, total=100)
    for done in range(1, 11):
        clock.now += WARMUP_SLOWDOWN if done <= WARMUP_STEPS else 1.0
        bar.update(done, loss=1.0, lr=1e-4)
    # 90 steps of a second left; the average since the start would say 0:03:18
    assert library_lines() == ["epoch 1/1 [10/100] loss 1.0000  lr 1.00e-04  1.00 it/s  eta 0:01:30"]


def test_the_training_bar_shows_the_recent_eta_not_riches(library_lines):
    clock, terminal = FakeClock(), Terminal()
    bar = Progress(log_every=10, stream=terminal, clock=clock)
    bar.start_epoch(0, 1, total=100)
    for done in range(1, 11):
        clock.now += WARMUP_SLOWDOWN if done <= WARMUP_STEPS else 1.0
        bar.update(done, loss=1.0, lr=1e-4)
    bar.end_epoch()
    assert "10/100" in terminal.getvalue() and "eta 0:01:30" in terminal.getvalue()
    assert not library_lines()  # the bar instead of the lines


def test_a_loop_off_a_terminal_gives_a_line_a_tenth_at_most(library_lines):
    clock = FakeClock()
    for _ in track(range(1000), "writing", unit="images", stream=io.StringIO(), clock=clock):
        clock.now += 0.1
    lines = library_lines()
    assert 5 <= len(lines) <= 12, lines
    assert lines[0].startswith("writing: ") and "images (" in lines[0] and "eta 0:01:" in lines[0]
    assert lines[-1] == "writing: 1000/1000 images, done in 0:01:40"


def test_a_short_loop_gives_no_line_and_a_slow_one_a_line_a_minute(library_lines):
    assert list(track(range(50), "quick", stream=io.StringIO())) == list(range(50))
    assert not library_lines()
    clock = FakeClock()
    for _ in track(iter(range(10)), "slow", unit="batches", stream=io.StringIO(), clock=clock):  # no total
        clock.now += 30.0
    assert library_lines() == ["slow: 2 batches, 0:01:00", "slow: 4 batches, 0:02:00", "slow: 6 batches, 0:03:00",
                            "slow: 8 batches, 0:04:00", "slow: 10 batches, 0:05:00"]  # fmt: skip


def test_a_loop_on_a_terminal_shows_a_bar_with_the_recent_eta(library_lines):
    clock, terminal = FakeClock(), Terminal()
    for done, _ in enumerate(track(range(100), "evaluating", stream=terminal, clock=clock)):
        if done == 50:
            break  # after 50 items: 50 seconds left
        clock.now += WARMUP_SLOWDOWN if done < WARMUP_STEPS else 1.0
    assert "evaluating" in terminal.getvalue() and "50/100" in terminal.getvalue()
    assert "eta 0:00:50" in terminal.getvalue()
    assert not library_lines()


def test_nothing_shows_under_quiet(caplog):
    """``sdetr -q`` sets the ``sparse_detr`` logger to WARNING: no bar, no lines, even on a terminal."""
    caplog.set_level(logging.WARNING, logger="sparse_detr")
    clock, terminal = FakeClock(), Terminal()
    items = []
    for item in track(range(1000), "writing", stream=terminal, clock=clock):
        clock.now += 1.0
        items.append(item)
    with timed_step("building…", "built"):
        pass
    assert items == list(range(1000)) and terminal.getvalue() == "" and not caplog.records


def test_timed_step_gives_its_seconds_and_no_end_line_on_failure(library_lines):
    clock = FakeClock()
    with timed_step("building the thing…", "built the thing", clock=clock):
        clock.now += 6.3
    with pytest.raises(RuntimeError), timed_step("building another…", "built another", clock=clock):
        raise RuntimeError("compiler failed")
    assert library_lines() == ["building the thing…", "built the thing in 6.3 s", "building another…"]


def test_writing_the_dataset_shows_a_status_line_and_progress(tmp_path, monkeypatch, library_lines):
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.0)  # a line per tenth, however fast the machine
    out = make_synthetic_dataset(tmp_path / "synth", num_train=10, num_val=2, image_size=48)
    lines = library_lines()
    assert lines[0] == f"writing the synthetic dataset (10 + 2 images) to {out}, once…"
    train = [line for line in lines if line.startswith("writing the train images: ")]
    assert len(train) == 10 and train[0].startswith("writing the train images: 1/10 images (10 %), eta ")
    assert train[-1].startswith("writing the train images: 10/10 images, done in ")


def test_a_kernel_build_says_what_it_builds_once_and_how_long_it_took(tmp_path, monkeypatch, library_lines):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached library: a build
    monkeypatch.setattr(loader, "cannot_build", lambda kind, build_dir: None)
    monkeypatch.setattr(loader, "compile_extension", lambda kind, build_dir: build_dir / "library.so")
    assert loader._load_or_build("cpu").available
    build_dir = loader.build_directory("cpu")
    assert library_lines()[0] == (
        f"building the C++ deformable-attention kernel (once per machine and torch version; cached in {build_dir}; "
        "about 30 s)…"
    )
    assert library_lines()[1].startswith("built the C++ deformable-attention kernel in ")

    def failing(kind, build_dir):
        raise loader.BackendUnavailableError("building the 'cpu' kernels failed")

    monkeypatch.setattr(loader, "compile_extension", failing)
    assert not loader._load_or_build("cpu").available
    assert len(library_lines()) == 3 and library_lines()[2].startswith("building the C++")  # no "built" line


def test_the_onnxruntime_library_build_has_the_same_lines(tmp_path, monkeypatch, library_lines):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(onnxruntime_library, "_built", {})
    monkeypatch.setattr(onnxruntime_library, "_compile", lambda build_dir, library: None)
    onnxruntime_library.library_path()
    build_dir = onnxruntime_library.build_directory()
    assert library_lines()[0] == (
        f"building the onnxruntime custom-op library (once per machine; cached in {build_dir}; a few seconds)…"
    )
    assert library_lines()[1].startswith("built the onnxruntime custom-op library in ")


def test_the_cpu_build_hides_torchs_no_cuda_runtime_warning(tmp_path):
    """torch warns "No CUDA runtime is found" when it finds a CUDA_HOME without a GPU: before the CPU build
    that reads as an error."""
    environment = {**os.environ, "CUDA_HOME": str(tmp_path)}  # a CUDA_HOME that exists
    code = "from sparse_detr.ops.loader import _cpp_extension; _cpp_extension()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stdout + result.stderr


@pytest.fixture
def library_logger():
    """The ``sparse_detr`` logger, its level restored after the test (``sdetr`` sets it)."""
    logger = logging.getLogger("sparse_detr")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_sdetr_eval_says_what_it_evaluates_and_what_it_wrote(tmp_path, library_logger):
    from typer.testing import CliRunner

    from sparse_detr.cli import app

    root = make_synthetic_dataset(tmp_path / "synth", num_train=1, num_val=2, image_size=96)
    _, _, val_images, val_ann = synthetic_splits(root)
    torch.manual_seed(0)
    model = build_model(apply_overrides(get_preset("tiny"), {"model.num_classes": 7}))
    checkpoint = save_checkpoint(tmp_path / "model.pth", model, train_config={"image_size": 96})
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--val-images", str(val_images),
                                      "--val-ann", str(val_ann), "--workers", "0", "--batch-size", "1",
                                      "--output-dir", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"evaluating {checkpoint} on {val_images} ({val_ann}): 2 images, rho {model.keep_ratio:g}, image size 96, "
        "batch 1, cpu"
    )
    assert f"wrote the metrics to {out / 'eval_model.json'}" in lines
    assert f"wrote the detections (COCO results) to {out / 'detections_model.json'}" in lines
    assert "AP @[IoU=0.50:0.95" in result.stdout  # the results stay on stdout
