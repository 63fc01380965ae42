"""Bad input and faults, as a hostile but realistic user meets them: every case is one line that names the
file or option (exit code 2 for usage, 1 for failures), no silently wrong AP, and no run that cannot be
recovered."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import tomli_w
import torch
from conftest import TINY_CATEGORIES, lock_held_elsewhere, one_line, save_tiny_checkpoint, tiny_model
from PIL import Image
from typer.testing import CliRunner

from sparse_detr import engine, zoo
from sparse_detr.ablation import SweepError, default_sweep, resolve_sweep
from sparse_detr.ablation.runner import SWEEP_FILE, claim_report_folder
from sparse_detr.ablation.sweep import sweep_to_dict
from sparse_detr.analysis.benchmark import check_fits
from sparse_detr.checkpoint import OFFICIAL_ARGS, read_checkpoint, save_checkpoint
from sparse_detr.cli import app
from sparse_detr.config import (
    MAX_IMAGE_SIZE,
    Config,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    check_keep_ratio,
    get_preset,
)
from sparse_detr.data import (
    SHAPES,
    CocoDetection,
    collate,
    load_rgb_image,
    make_synthetic_dataset,
    synthetic_splits,
)
from sparse_detr.data.annotations import AnnotationFileError, load_coco_annotations
from sparse_detr.engine import build_datasets, train
from sparse_detr.engine import setup as engine_setup
from sparse_detr.engine import step as step_module
from sparse_detr.engine import trainer as trainer_module
from sparse_detr.engine.evaluate import encoder_tokens
from sparse_detr.engine.initialization import InitialWeights
from sparse_detr.errors import CheckpointError, ConfigError, DeviceError, NonFiniteError, OutputError, SparseDetrError
from sparse_detr.models import build_model
from sparse_detr.ops import loader
from sparse_detr.utils.cache import user_cache_dir
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import file_sha256
from sparse_detr.utils.lock import LOCK_NAME, FolderInUseError, folder_lock
from sparse_detr.zoo import load_model

runner = CliRunner()
IMAGE_SIZE = 96
SDETR = Path(sys.executable).with_name("sdetr")
ONE_STEP = ["--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "2", "--image-size", "96", "--workers", "0"]

QUICK = ["--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2", "--image-size", "96", "--workers", "0"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small copy of the built-in dataset (8 training, 4 validation images of 96 pixels)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=8, num_val=4, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def run_folder(synth, tmp_path_factory):
    """A finished one-epoch tiny run on ``synth``."""
    folder = tmp_path_factory.mktemp("run") / "run"
    arguments = ["train", "--preset", "tiny", "--data", str(synth), *QUICK, "--output-dir", str(folder)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    return folder


def copy_dataset(synth, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(synth, target)
    return target


def edit_annotations(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def synth_checkpoint(path: Path, nan: bool = False) -> Path:
    """A random tiny checkpoint of the built-in dataset's categories (labels 1..6, 20 queries), trained for
    96 pixels; ``nan``: every weight NaN, as a run that diverged unnoticed would leave it."""
    model = tiny_model({"model.num_classes": len(SHAPES) + 1, "model.num_queries": 20})
    if nan:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(math.nan)
    categories = {label: {"id": label, "name": name} for label, name in enumerate(SHAPES, 1)}
    return save_checkpoint(path, model, categories=categories, train_config={"image_size": 96})


# -- annotation files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON"),
        ('{"images": [], "categories": [{"id": 1, "name": "x"}]}', "key 'annotations' is missing"),
        ('{"images": [{"id": 1.5, "file_name": "a.png"}], "annotations": [], "categories": [{"id": 1, "name": "x"}]}',
         "'images' entry #0 has id 1.5"),
    ],
)  # fmt: skip
def test_broken_annotation_files_are_one_line_in_train_and_eval(synth, run_folder, tmp_path, content, fragment):
    data = copy_dataset(synth, tmp_path)
    (data / "annotations" / "instances_val.json").write_text(content)
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *QUICK, "--output-dir", "x"])
    one_line(result, 1, "instances_val.json", fragment)
    result = runner.invoke(app, ["eval", "--checkpoint", str(run_folder), "--data", str(data), "--workers", "0"])
    one_line(result, 1, "instances_val.json", fragment)


@pytest.mark.parametrize("bbox", [[1, 1, -4, 5], [1, 1, float("nan"), 5], [1, 1, 5, float("inf")], [1, 1, 0, 5]])
def test_bad_boxes_are_dropped_for_training_and_refused_for_evaluation(synth, tmp_path, bbox):
    data = copy_dataset(synth, tmp_path)
    train_ann, val_ann = data / "annotations" / "instances_train.json", data / "annotations" / "instances_val.json"
    for path in (train_ann, val_ann):
        edit_annotations(path, lambda d: d["annotations"][0].update(bbox=bbox, id=4242))
    with pytest.warns(UserWarning, match=r"dropped 1 of \d+ annotations: 1 with .* \(e\.g\. annotation id 4242\)"):
        dataset = CocoDetection(data / "train", train_ann, train=True)
    assert 4242 not in dataset.coco.anns
    with pytest.raises(AnnotationFileError, match=r"instances_val\.json: annotation id 4242 has a bbox .* AP"):
        CocoDetection(data / "val", val_ann)


# -- checkpoints --------------------------------------------------------------------------------------------


def test_files_that_are_no_checkpoints(synth, run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"certainly not a checkpoint")
    result = runner.invoke(app, ["eval", "--checkpoint", "junk.pth", "--data", str(synth)])
    one_line(result, 1, "junk.pth is not a PyTorch checkpoint")
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(synth), *QUICK, "--resume", "junk.pth"])
    one_line(result, 1, "junk.pth is not a PyTorch checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "dict.pth")
    result = runner.invoke(app, ["eval", "--checkpoint", "dict.pth", "--data", str(synth)])
    one_line(result, 1, "dict.pth is not a detector checkpoint: no 'model' state dict")


class Payload:
    """Unpickling it would run a command: safe loading must refuse it everywhere, in both formats."""

    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-by-design",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickles_that_hold_code_are_refused_with_their_name(run_folder, tmp_path, zip_format):
    content = read_checkpoint(run_folder / "checkpoint.pth")
    content["payload"] = Payload()
    path = tmp_path / "evil.pth"
    torch.save(content, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"evil\.pth holds shutil\.rmtree object\(s\), which safe loading"):
        read_checkpoint(path)
    result = runner.invoke(app, ["eval", "--checkpoint", str(path)])
    line = one_line(result, 1, "shutil.rmtree", "trust_checkpoint=True")
    assert "weights_only=False" not in line  # not torch's advice to unpickle it anyway


def test_a_good_checkpoint_on_a_missing_gpu_says_so(run_folder, synth):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    result = runner.invoke(app, ["eval", "--checkpoint", str(run_folder), "--data", str(synth), "--device", "cuda"])
    line = one_line(result, 2, "--device cuda", "no CUDA GPU", "--device cpu")
    assert "not a PyTorch checkpoint" not in line
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(synth), *QUICK, "--device", "cuda"])
    one_line(result, 2, "no CUDA GPU")


def test_evaluation_refuses_a_checkpoint_of_other_categories(run_folder, synth, tmp_path):
    data = copy_dataset(synth, tmp_path)
    val_ann = data / "annotations" / "instances_val.json"
    edit_annotations(val_ann, lambda d: d["categories"][0].update(name="person"))
    arguments = [
        "eval",
        "--checkpoint",
        str(run_folder),
        "--data",
        str(data),
        "--workers",
        "0",
        "--output-dir",
        str(tmp_path / "eval"),
    ]
    result = runner.invoke(app, arguments)
    one_line(result, 2, "was trained on other categories", "label 1: 'person' here, 'circle' in the checkpoint",
             "--allow-other-categories")  # fmt: skip
    result = runner.invoke(app, [*arguments, "--allow-other-categories"])
    assert result.exit_code == 0, result.output


def test_resume_refuses_other_categories(run_folder, synth, tmp_path):
    data = copy_dataset(synth, tmp_path)
    for split in ("train", "val"):
        edit_annotations(data / "annotations" / f"instances_{split}.json",
                         lambda d: d["categories"][1].update(name="kite"))  # fmt: skip
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *QUICK, "--epochs", "2",
                                 "--resume", str(run_folder), "--output-dir", str(tmp_path / "resumed")])  # fmt: skip
    one_line(result, 2, "was trained on other categories", "--init")


def test_resuming_a_checkpoint_without_training_state_says_to_start_from_it(synth, tmp_path):
    """A file saved for inference (or a released one) holds weights but no optimizer state: --resume cannot
    continue it, and says that --init starts a new run from its weights."""
    model = build_model(apply_overrides(get_preset("tiny"), {"model.num_classes": len(SHAPES) + 1}))
    weights = save_checkpoint(tmp_path / "weights.pth", model)
    result = runner.invoke(app, train_command(synth, tmp_path / "run", "--resume", str(weights)))
    one_line(result, 1, f"{weights} holds a model but no training state", f"--init {weights}")


# -- options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, code, fragments",
    [
        (["train", "--preset", "sparse"], 2, ["unknown preset 'sparse'"]),
        (["train", "--rho", "nan"], 2, ["model.keep_ratio must be a number in [0, 1]", "got nan"]),
        (["eval", "--checkpoint", "RUN", "--rho", "nan"], 2, ["keep_ratio must be a number in [0, 1]", "got nan"]),
        (["train", "--image-size", "48"], 2, ["fewer than the 50 queries", "--image-size 68 or more"]),
        (["train", "--amp", "fp8"], 2, ["amp must be one of"]),
        (["train", "--device", "tpu"], 2, ["--device 'tpu' is no device"]),
    ],
)
def test_bad_options_stop_before_anything_is_written(run_folder, synth, tmp_path, monkeypatch, arguments, code,
                                                     fragments):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    arguments = [str(run_folder) if argument == "RUN" else argument for argument in arguments]
    extra = ["--data", str(synth)]
    if arguments[0] == "train":
        extra += ["--output-dir", "out"] + ([] if "--preset" in arguments else ["--preset", "tiny"])
    one_line(runner.invoke(app, [*arguments, *extra]), code, *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_an_unwritable_run_folder_is_named(synth, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run folder's parent should be")
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(synth), *QUICK,
                                 "--output-dir", str(blocker / "run")])  # fmt: skip
    line = one_line(result, 1, f"cannot write to {blocker / 'run'}")
    assert ".tmp" not in line  # the folder, not a temporary file


def test_debug_shows_the_traceback_and_bugs_keep_theirs(synth, monkeypatch):
    result = runner.invoke(app, ["--debug", "train", "--preset", "sparse"])
    assert isinstance(result.exception, SparseDetrError)  # raised, with its traceback
    monkeypatch.setenv("SDETR_DEBUG", "1")
    result = runner.invoke(app, ["train", "--preset", "sparse"])
    assert isinstance(result.exception, SparseDetrError)
    monkeypatch.delenv("SDETR_DEBUG")

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("sparse_detr.engine.run_config.resolve_run_config", bug)
    result = runner.invoke(app, ["train", "--preset", "tiny"])
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a red line


def test_wrong_types_in_an_experiment_file_name_file_table_and_key(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('preset = "tiny"\n[train]\nepochs = "eight"\n')
    result = runner.invoke(app, ["ablate", str(path)])
    one_line(result, 2, "sweep.toml", "[train] epochs must be an integer, got 'eight'")


# -- divergence ---------------------------------------------------------------------------------------------


def test_a_blown_up_learning_rate_stops_before_the_matcher_crashes(synth, tmp_path):
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(synth), *QUICK, "--epochs", "2", "--lr",
                                 "1e30", "--clip-max-norm", "0", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    one_line(result, 1, "became NaN or infinite at epoch 1", "no checkpoint had been written yet", "--lr")


def _tiny_config(output_dir, **changes) -> TrainConfig:
    base = dict(epochs=3, batch_size=2, workers=0, image_size=IMAGE_SIZE, iters_per_epoch=2, eval_every_epochs=3,
                output_dir=str(output_dir), log_every=1, seed=3)  # fmt: skip
    return TrainConfig(**{**base, **changes})


@pytest.mark.slow
def test_a_diverged_run_resumes_from_its_last_good_checkpoint(synth, tmp_path, monkeypatch):
    """Weights turn NaN in epoch 2: the run stops naming the step, the checkpoint of epoch 1 stays, and a
    resume (here with a lower learning rate) finishes."""
    datasets = build_datasets(*synthetic_splits(synth), image_size=IMAGE_SIZE)
    real_build = engine_setup.build_optimizer

    def poisoned_optimizer(model, config, world_size):
        optimizer, steps = real_build(model, config, world_size), []

        def poison(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == 3:  # the first step of epoch 2
                with torch.no_grad():
                    next(model.parameters()).fill_(math.nan)

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(engine_setup, "build_optimizer", poisoned_optimizer)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"the weights after the optimizer step became NaN or infinite at step 3"):
        train(get_preset("tiny"), _tiny_config(out), *datasets)
    good = read_checkpoint(out / "checkpoint.pth")
    assert (good["epoch"], good["step"]) == (1, 2)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())

    monkeypatch.setattr(engine_setup, "build_optimizer", real_build)
    metrics = train(get_preset("tiny"), _tiny_config(out, lr=5e-4), *datasets)
    assert set(metrics) >= {"AP"}
    final = read_checkpoint(out / "checkpoint.pth")
    lr = final["optimizer"]["param_groups"][0]["initial_lr"]
    assert final["step"] == 6 and lr == pytest.approx(5e-4 * math.sqrt(2 / 16))  # the new rate, scaled by batch


def test_the_matcher_refuses_non_finite_costs():
    from sparse_detr.models.matcher import HungarianMatcher

    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), math.nan)}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(NonFiniteError, match="non-finite matching costs"):
        HungarianMatcher()(outputs, targets)


# -- bad images ---------------------------------------------------------------------------------------------


def break_images(data):
    """One unreadable validation image, and one of 200x1 pixels: its shorter side would round to 0 when
    resized under the longer side's cap, and alone it gives fewer tokens (49) than queries."""
    val = data / "val"
    names = sorted(path.name for path in val.glob("*.png"))
    (val / names[0]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (200, 1), (90, 90, 90)).save(val / names[1])
    edit_annotations(data / "annotations" / "instances_val.json",
                     lambda d: d["images"][1].update(width=200, height=1))  # fmt: skip


@pytest.mark.slow
def test_a_bad_validation_image_costs_that_image_only(synth, tmp_path):
    data = copy_dataset(synth, tmp_path)
    break_images(data)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as warned:
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *QUICK, "--epochs", "2",
                                     "--output-dir", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    messages = " ".join(str(warning.message) for warning in warned)
    assert "000000.png: cannot read image" in messages and "image id 2: the image gives 49 tokens" in messages
    assert "2 of 4 images could not be evaluated" in messages
    detections = json.loads((out / "detections_epoch2.json").read_text())
    assert {d["image_id"] for d in detections} == {3, 4}
    with pytest.warns(UserWarning, match="2 of 4 images could not be evaluated"):
        result = runner.invoke(app, ["eval", "--checkpoint", str(out), "--data", str(data), "--workers", "0",
                                     "--batch-size", "1", "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_predict_writes_what_it_finished_and_names_what_failed(run_folder, synth, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth / "val", images)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "detections.json"
    result = runner.invoke(app, ["predict", str(images), "--checkpoint", str(run_folder), "--out", str(out),
                                 "--threshold", "0"])  # fmt: skip
    one_line(result, 1, "1 of 5 image(s) failed", "broken.png: cannot read image")
    files = {detection["file_name"] for detection in json.loads(out.read_text())}
    assert len(files) == 4 and not any("broken" in name for name in files)


# -- interrupted writes -------------------------------------------------------------------------------------


def test_temporaries_of_killed_writes_are_removed_when_the_run_starts_again(synth, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".checkpoint.pth.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    (out / "keep.txt").write_text("not ours")
    datasets = build_datasets(*synthetic_splits(synth), image_size=IMAGE_SIZE)
    config = _tiny_config(out, epochs=1, eval_every_epochs=1)
    train(get_preset("tiny"), config, *datasets, InitialWeights())
    assert not leftover.exists() and (out / "keep.txt").exists() and (out / "checkpoint.pth").is_file()
    assert not list(out.glob(".*.tmp"))


def test_a_newer_checkpoint_format_is_one_line(run_folder, tmp_path):
    content = read_checkpoint(run_folder / "checkpoint.pth")
    content["config"]["model"]["invented_later"] = 1
    path = tmp_path / "newer.pth"
    torch.save(content, path)
    result = runner.invoke(app, ["eval", "--checkpoint", str(path)])
    one_line(result, 1, "newer.pth stores a configuration this version cannot read", "invented_later")


def test_offline_zoo_names_the_link_and_the_alternative(monkeypatch, tmp_path):
    import torch.hub

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("SDETR_ZOO_DIR", str(tmp_path / "zoo"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = runner.invoke(app, ["eval", "--checkpoint", "sparse-detr-r50-rho0.1"])
    one_line(result, 1, "https://arena.kakaocdn.net/brainrepo/sparse_detr/sparse_detr_r50_10.pth", "--checkpoint FILE")
    assert not list((tmp_path / "zoo").glob("*"))


def test_legacy_checkpoints_stored_none_for_the_backbone_source(tmp_path):
    """Checkpoints written before pretrained_backbone named its source stored None: they still load."""
    model = build_model(apply_overrides(get_preset("tiny"), {"model.num_queries": 20}))
    path = save_checkpoint(tmp_path / "old.pth", model)
    content = torch.load(path, weights_only=True)
    content["config"]["model"]["pretrained_backbone"] = None
    torch.save(content, path)
    assert load_model(path).config.model.pretrained_backbone == "none"


def test_argparse_namespace_of_released_files_is_still_allowed(tmp_path):
    model = build_model(apply_overrides(get_preset("tiny"), {"model.num_queries": 20}))
    path = tmp_path / "released.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(backbone="resnet10t")}, path)
    assert isinstance(read_checkpoint(path)["args"], argparse.Namespace)


# -- training safety: divergence, Ctrl-C and SIGTERM, resumed logs, a full disk, boxes beyond the queries ---


# one epoch of 4 optimizer steps on the 8 training images, a checkpoint after each
STEPS = ["--epochs", "1", "--batch-size", "2", "--image-size", str(IMAGE_SIZE), "--workers", "0",
         "--checkpoint-every-iters", "1"]  # fmt: skip


def train_command(synth, out, *options: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(synth), *STEPS, "--output-dir", str(out), *options]


def lr(rate: str) -> list[str]:
    """The options that set every learning rate to ``rate``."""
    return ["--lr", rate, "--lr-backbone", rate]


def assert_good_checkpoint(path: Path, synth) -> dict:
    """``path`` holds finite weights whose model, in evaluation mode, gives finite outputs; returns it."""
    checkpoint = read_checkpoint(path)
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())
    _, val_set = build_datasets(*synthetic_splits(synth), image_size=IMAGE_SIZE)
    images, mask, _ = collate([val_set[0], val_set[1]])
    with torch.no_grad():
        outputs = load_model(path)(images, mask)
    assert torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_boxes"]).all()
    return checkpoint


def ctrl_c_during_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """The process gets ``signum`` while it trains optimizer step ``step`` (as from a terminal's Ctrl-C)."""
    real_step, calls = trainer_module.train_step, []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", signalled_step)


def metric_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.mark.slow
def test_a_blow_up_keeps_the_last_good_checkpoint_and_a_lower_lr_trains_on(synth, tmp_path, monkeypatch):
    """Two good steps, then an exploding learning rate with a checkpoint every step: the checkpoint left is
    one whose model gives finite outputs, the message names it, and resuming it with a small --lr finishes."""
    out = tmp_path / "run"
    ctrl_c_during_step(monkeypatch, 2)
    one_line(runner.invoke(app, train_command(synth, out)), 130, "step 2")
    monkeypatch.undo()

    exploding = runner.invoke(app, train_command(synth, out, "--resume", str(out), *lr("1e4")))
    line = one_line(exploding, 1, "became NaN or infinite", "training stopped and the last good checkpoint",
                    f"Resume from it with --resume {out} and a lower --lr")  # fmt: skip
    kept = int(re.search(rf"{re.escape(str(out / 'checkpoint.pth'))} \(step (\d+)\) is kept", line)[1])
    assert kept >= 2 and assert_good_checkpoint(out / "checkpoint.pth", synth)["step"] == kept

    result = runner.invoke(app, train_command(synth, out, "--resume", str(out), *lr("1e-4")))
    assert result.exit_code == 0, result.output
    assert "learning rates changed on resume" in result.output
    assert assert_good_checkpoint(out / "checkpoint.pth", synth)["step"] == 4


def test_a_checkpoint_is_only_written_for_a_model_with_finite_outputs(synth, tmp_path):
    """An exploding learning rate from the first step, a checkpoint after each: whatever the run leaves on
    disk gives finite outputs (training mode's batch statistics can hide a blow-up evaluation mode shows)."""
    out = tmp_path / "run"
    result = runner.invoke(app, train_command(synth, out, *lr("1e4")))
    one_line(result, 1, "became NaN or infinite", "training stopped")
    if (out / "checkpoint.pth").exists():
        assert_good_checkpoint(out / "checkpoint.pth", synth)


def test_a_run_that_diverges_before_its_first_checkpoint_says_to_start_again(synth, tmp_path):
    result = runner.invoke(app, train_command(synth, tmp_path / "run", "--lr", "1e30", "--clip-max-norm", "0"))
    line = one_line(result, 1, "became NaN or infinite", "no checkpoint had been written yet",
                    "Start again with a lower --lr")  # fmt: skip
    assert "resume" not in line.lower()
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_ctrl_c_in_the_first_epoch_saves_the_last_step_and_the_same_command_resumes(synth, tmp_path, monkeypatch):
    out = tmp_path / "run"
    command = train_command(synth, out, "--checkpoint-every-iters", "0", "--set", "train.log_every=1")
    ctrl_c_during_step(monkeypatch, 2)
    line = one_line(runner.invoke(app, command), 130)
    assert line == (f"error: training stopped by Ctrl-C in epoch 1 after batch 2 of 4 (step 2); "
                    f"{out / 'checkpoint.pth'} holds step 2: run the same command again to resume "
                    f"(or add --resume {out})")  # fmt: skip
    checkpoint = assert_good_checkpoint(out / "checkpoint.pth", synth)
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["step"]) == (0, 2, 2)
    monkeypatch.undo()

    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "batch 2, step 2" in result.output
    assert read_checkpoint(out / "checkpoint.pth")["step"] == 4
    assert metric_steps(out) == [1, 2, 3, 4]


def test_ctrl_c_before_the_first_step_says_nothing_was_saved(synth, tmp_path, monkeypatch):
    real_collate = engine_setup.collate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # while the first batch is loaded: it stops at once
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(engine_setup, "collate", interrupted)
    result = runner.invoke(app, train_command(synth, tmp_path / "run"))
    one_line(result, 130, "training stopped by Ctrl-C in epoch 1 after batch 0 of 4 (step 0), before any "
             "checkpoint was written: run the same command again to start over")  # fmt: skip
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint_before(synth, tmp_path, monkeypatch):
    real_step, calls = trainer_module.train_step, []

    def twice_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # held until the step is done ...
            os.kill(os.getpid(), signal.SIGINT)  # ... unless a second one comes
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", twice_interrupted)
    out = tmp_path / "run"
    one_line(runner.invoke(app, train_command(synth, out)), 130,
             f"{out / 'checkpoint.pth'} holds step 2: run the same command again")  # fmt: skip
    assert read_checkpoint(out / "checkpoint.pth")["step"] == 2


def signalled_sdetr(arguments: list[str], ready, waiting_for: str, signum: int, code: int, poll: float) -> str:
    """Run ``sdetr arguments`` (one thread), send ``signum`` once ``ready()``, and return its error line,
    checked: exit ``code``, no traceback, exactly one ``error:`` line (the rest of the output is progress)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    process = subprocess.Popen([str(SDETR), *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, waiting_for
        time.sleep(poll)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stdout
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_in_the_first_epoch_of_sdetr_train_leaves_a_checkpoint_to_resume(tmp_path, signum, code, name):
    """A real ``sdetr train`` process: the signal comes in its first epoch (its first metrics row is out)."""
    synth = make_synthetic_dataset(tmp_path / "synth", num_train=20, num_val=2, image_size=IMAGE_SIZE)
    out = tmp_path / "run"
    arguments = ["train", "--preset", "tiny", "--data", str(synth), "--epochs", "1", "--batch-size", "2",
                 "--image-size", str(IMAGE_SIZE), "--workers", "0", "--set", "train.log_every=1",
                 "--output-dir", str(out)]  # fmt: skip
    metrics = out / "metrics.jsonl"
    error = signalled_sdetr(arguments, lambda: metrics.is_file() and bool(metrics.read_text().strip()),
                            "sdetr train never logged its first step", signum, code, poll=0.05)  # fmt: skip
    checkpoint = read_checkpoint(out / "checkpoint.pth")
    step = checkpoint["step"]
    assert checkpoint["epoch"] == 0 and 1 <= step < 10
    assert error == (f"error: training stopped by {name} in epoch 1 after batch {step} of 10 (step {step}); "
                         f"{out / 'checkpoint.pth'} holds step {step}: run the same command again to resume "
                         f"(or add --resume {out})")  # fmt: skip

    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out / "checkpoint.pth")["step"] == 10
    assert metric_steps(out) == list(range(1, 11))


class _Killed(Exception):
    pass


def test_a_resumed_run_logs_every_step_once(synth, tmp_path, monkeypatch):
    """Killed inside step 4 with its checkpoint at step 2 and rows up to step 3: the resumed run drops the
    row of step 3 (and a line the kill tore) and logs steps 3 and 4 once."""
    datasets = build_datasets(*synthetic_splits(synth), image_size=IMAGE_SIZE)
    config = TrainConfig(epochs=1, batch_size=2, workers=0, image_size=IMAGE_SIZE, checkpoint_every_iters=2,
                         log_every=1, output_dir=str(tmp_path / "run"), seed=3)  # fmt: skip
    real_clip, calls = step_module.clip_grad_norm_, []

    def killed_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            with (tmp_path / "run" / "metrics.jsonl").open("a") as file:
                file.write('{"epoch": 1, "iter')  # a row the kill cut off
            raise _Killed
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(step_module, "clip_grad_norm_", killed_in_step_4)
    with pytest.raises(_Killed):
        train(get_preset("tiny"), config, *datasets)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] == 2
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows[:-1]] == [1, 2, 3]
    monkeypatch.undo()

    train(get_preset("tiny"), config, *datasets)
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "eval_AP" in row] == [1]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
            "data/7: file write failed"
        ),
    ],
    ids=["oserror", "torch-writer"],
)
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(synth, tmp_path, monkeypatch, failure):
    real_save, calls = torch.save, []

    def full_disk(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            file.write(b"half a checkpoint")
            raise failure
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    checkpoint = out / "checkpoint.pth"
    line = one_line(runner.invoke(app, train_command(synth, out)), 1, f"cannot write {checkpoint}",
                    f"training stopped at step 2 and {checkpoint} (step 1) is kept to resume from")  # fmt: skip
    disk_full = "the disk is full" in line
    assert disk_full if isinstance(failure, OSError) else "check that its disk has free space" in line
    monkeypatch.undo()
    assert assert_good_checkpoint(checkpoint, synth)["step"] == 1
    assert not list(out.glob(".*.tmp"))


def test_an_unrelated_runtime_error_in_a_write_is_no_disk_message(tmp_path):
    from sparse_detr.utils.io import atomic_write

    def bug(tmp):
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer") as raised:
        atomic_write(tmp_path / "file", bug)
    assert not isinstance(raised.value, SparseDetrError)
    assert not list(tmp_path.iterdir())


def test_images_with_more_boxes_than_queries_are_counted_once(synth, tmp_path):
    """The busiest training image gets its boxes twice over; with 5 queries the warning counts the images
    holding more than 5, once, before training."""
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    path = data / "annotations" / "instances_train.json"
    content = json.loads(path.read_text())
    per_image = Counter(ann["image_id"] for ann in content["annotations"])
    busiest = max(per_image, key=per_image.get)
    next_id = max(ann["id"] for ann in content["annotations"]) + 1
    twice = [ann for ann in content["annotations"] if ann["image_id"] == busiest]
    content["annotations"] += [{**ann, "id": next_id + index} for index, ann in enumerate(twice)]
    path.write_text(json.dumps(content))
    per_image[busiest] *= 2
    over = [count for count in per_image.values() if count > 5]
    assert 1 <= len(over) < len(content["images"])

    options = ["--set", "model.num_queries=5", "--checkpoint-every-iters", "0", "--iters-per-epoch", "1"]
    with pytest.warns(UserWarning) as warned:
        result = runner.invoke(app, train_command(data, tmp_path / "run", *options))
    assert result.exit_code == 0, result.output
    messages = [str(warning.message) for warning in warned if "queries" in str(warning.message)]
    assert messages == [
        f"{len(over)} of {len(content['images'])} training images have more boxes than the model's 5 queries "
        f"(up to {max(over)}): only 5 boxes of an image can be matched and the rest are never learned; raise "
        "model.num_queries (--set model.num_queries=N)"
    ]


# -- run folders: the lock, one rule for new and resumed runs, --init, --print-config, config files ---------


TRAIN = ["train", "--preset", "tiny", "--data", "synth", *QUICK]  # run in a workspace: runs/tiny by default


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workspace: ``synth`` (8 training, 4 validation images of 96 pixels) and ``runs/tiny``, the finished
    one-epoch run of :data:`TRAIN`."""
    workspace = tmp_path_factory.mktemp("workspace")
    make_synthetic_dataset(workspace / "synth", num_train=8, num_val=4, image_size=96)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        ok(runner.invoke(app, TRAIN))
    assert (workspace / "runs" / "tiny" / "checkpoint.pth").is_file()
    return workspace


@pytest.fixture
def workspace(finished, tmp_path, monkeypatch, one_thread):
    """A copy of :func:`finished`, the current folder."""
    copy = tmp_path / "workspace"
    shutil.copytree(finished, copy)
    monkeypatch.chdir(copy)
    return copy


def test_a_run_folder_in_use_stops_a_second_train_and_a_killed_holder_never_blocks(workspace):
    with lock_held_elsewhere("runs/tiny") as holder:  # killed after: its lock file stays behind
        result = runner.invoke(app, TRAIN)
        one_line(result, 1, f"runs/tiny is in use by another run: process {holder.pid} on {socket.gethostname()} since")
    assert json.loads((workspace / "runs/tiny" / LOCK_NAME).read_text())["pid"] == holder.pid
    with pytest.warns(UserWarning, match=f"runs/tiny: taking over the lock that process {holder.pid} on"):
        text = ok(runner.invoke(app, TRAIN))
    assert "runs/tiny already finished 1 epochs" in text
    assert not (workspace / "runs/tiny" / LOCK_NAME).exists()


def test_a_stale_lock_file_is_taken_over_and_locks_nest(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2024-01-01 00:00:00"}
    (folder / LOCK_NAME).write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=f"taking over the lock that process {dead.pid} on .* since 2024-01-01"):
        with folder_lock(folder):
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
            with folder_lock(tmp_path / "other" / ".." / "run"):  # the same folder again in this process: held once
                pass
            assert (folder / LOCK_NAME).exists()
    assert not (folder / LOCK_NAME).exists()


def test_only_rank_0_takes_the_lock_and_an_unused_new_folder_is_not_left(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with folder_lock(tmp_path / "a"):
        assert not (tmp_path / "a").exists()
    monkeypatch.setenv("RANK", "0")
    with folder_lock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / LOCK_NAME).is_file()
    assert not (tmp_path / "new").exists()  # created for the lock, nothing written: removed


def test_folder_in_use_error_names_the_folder_and_the_holder(tmp_path):
    with lock_held_elsewhere(tmp_path) as holder:
        with pytest.raises(FolderInUseError, match=f"{tmp_path} is in use by another sweep: process {holder.pid}"):
            with folder_lock(tmp_path, what="sweep"):
                pass


def test_the_default_folder_resumes_the_same_run_and_numbers_another_configuration(workspace):
    tiny = workspace / "runs" / "tiny"
    before = digest(tiny / "checkpoint.pth")
    assert "runs/tiny already finished 1 epochs" in ok(runner.invoke(app, TRAIN))  # the same command
    assert digest(tiny / "checkpoint.pth") == before

    text = ok(runner.invoke(app, [*TRAIN, "--seed", "1"]))
    assert "runs/tiny holds a run of another configuration (train.seed differs): this run goes to runs/tiny-2" in text
    assert digest(tiny / "checkpoint.pth") == before and "seed = 1" in (tiny.parent / "tiny-2/config.toml").read_text()
    text = ok(runner.invoke(app, [*TRAIN, "--seed", "1"]))  # found again
    assert "this configuration's run is runs/tiny-2" in text and "runs/tiny-2 already finished" in text
    assert not (workspace / "runs" / "tiny-3").exists()

    text = ok(runner.invoke(app, [*TRAIN[: -len(QUICK)], *QUICK[2:], "--epochs", "2"]))  # the same run, longer
    assert "continuing the run in runs/tiny with train.epochs 1 -> 2, train.lr_drop 1 -> 2" in text
    assert "resumed from runs/tiny/checkpoint.pth: epoch 2" in text
    rows = [json.loads(line) for line in (tiny / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "lr" in row][-1]
    assert last["epoch"] == 2 and last["lr"] == pytest.approx(1e-3 * (2 / 16) ** 0.5)  # before the moved drop
    assert read_checkpoint(tiny / "checkpoint.pth")["epoch"] == 2


def test_an_explicit_folder_of_another_configuration_is_refused_unless_forced(workspace):
    tiny = workspace / "runs" / "tiny"
    before = digest(tiny / "checkpoint.pth")
    result = runner.invoke(app, [*TRAIN, "--seed", "1", "--set", "model.dropout=0.1", "--output-dir", "runs/tiny"])
    one_line(result, 2, "runs/tiny holds a run of another configuration (model.dropout, train.seed differ)",
             "another --output-dir, or --force")  # fmt: skip
    assert digest(tiny / "checkpoint.pth") == before
    (tiny / "detections_epoch5.json").write_text("[]")  # a file of the old run that the new one does not write
    (tiny / "notes.txt").write_text("mine")
    result = runner.invoke(app, [*TRAIN, "--output-dir", "runs/tiny", "--force", "--resume", "runs/tiny"])
    one_line(result, 2, "--force starts a new run and --resume continues one")

    text = ok(runner.invoke(app, [*TRAIN, "--seed", "1", "--output-dir", "runs/tiny", "--force"]))
    assert "--force: a new run in runs/tiny, replacing the run it held" in text and "resumed" not in text
    assert digest(tiny / "checkpoint.pth") != before and "seed = 1" in (tiny / "config.toml").read_text()
    assert not (tiny / "detections_epoch5.json").exists() and (tiny / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (tiny / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # this run's training and evaluation rows only


def test_init_starts_a_new_run_folder_and_never_writes_into_its_source(workspace):
    tiny = workspace / "runs" / "tiny"
    before = {name: digest(tiny / name) for name in ("checkpoint.pth", "config.toml", "metrics.jsonl")}
    init = ["train", "--init", "runs/tiny", "--data", "synth", *QUICK]
    text = ok(runner.invoke(app, init))
    assert "run folder: runs/tiny-finetune" in text and "resumed" not in text
    assert {name: digest(tiny / name) for name in before} == before
    started = json.loads((workspace / "runs/tiny-finetune/initial_weights.json").read_text())
    assert started["init"]["source"] == "runs/tiny" and started["init"]["with_backbone"] is True
    assert "runs/tiny-finetune already finished" in ok(runner.invoke(app, init))  # the same command

    result = runner.invoke(app, [*init, "--output-dir", "runs/tiny"])
    one_line(result, 2, "runs/tiny holds a run of another configuration (train.init differs)")
    result = runner.invoke(app, [*init, "--output-dir", "runs/tiny", "--force"])
    one_line(result, 2, "--init runs/tiny is read from runs/tiny: write the new run to another --output-dir")
    result = runner.invoke(app, [*init, "--resume", "runs/tiny"])
    one_line(result, 2, "init starts a new run from a checkpoint's weights and resume continues a run")
    assert {name: digest(tiny / name) for name in before} == before


def test_print_config_shows_the_data_classes_the_init_architecture_and_the_folder(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(finished)
    source = save_tiny_checkpoint(tmp_path / "source.pth")  # 20 queries, 4 classes
    text = ok(runner.invoke(app, ["train", "--init", str(source), "--data", "synth", *QUICK, "--print-config"]))
    for line in ("num_queries = 20", "num_classes = 7", 'output_dir = "runs/tiny-finetune"', f'init = "{source}"'):
        assert line in text, line
    text = ok(runner.invoke(app, ["train", "--preset", "sparse-rho0.1", "--data", "synth", "--print-config"]))
    assert "num_classes = 7" in text and 'output_dir = "runs/sparse-rho0.1"' in text  # the preset's is 91
    assert 'output_dir = "runs/tiny-2"' in ok(runner.invoke(app, [*TRAIN, "--seed", "3", "--print-config"]))
    assert not (finished / "runs" / "tiny-2").exists() and not (finished / "runs" / "sparse-rho0.1").exists()


def test_init_of_another_backbone_into_frozen_batchnorm_loads_its_pretrained_weights_or_stops(
    finished, tmp_path, monkeypatch, one_thread
):
    monkeypatch.chdir(finished)
    source = save_tiny_checkpoint(tmp_path / "source.pth")  # a resnet10t backbone
    frozen = ["train", "--init", str(source), "--data", "synth", *QUICK, "--backbone", "resnet18",
              "--set", "model.backbone_norm=frozen_bn", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    result = runner.invoke(app, frozen)  # tiny's pretrained_backbone is none: a random frozen backbone
    one_line(result, 2, f"--init {source} holds a resnet10t backbone, not this model's resnet18",
             "backbone_norm=frozen_bn cannot learn", "--pretrained-backbone imagenet|FILE")  # fmt: skip
    assert not (tmp_path / "run").exists()

    weights = timm.create_model("resnet18").state_dict()
    weights = {key: torch.rand_like(value) if key.endswith("running_mean") else value for key, value in weights.items()}
    torch.save(weights, tmp_path / "resnet18.pth")
    text = ok(runner.invoke(app, [*frozen, "--pretrained-backbone", str(tmp_path / "resnet18.pth")]))
    assert "tensors of another backbone not loaded" in text
    started = json.loads((tmp_path / "run" / "initial_weights.json").read_text())
    assert started["backbone"]["source"] == str(tmp_path / "resnet18.pth")
    assert started["init"]["file"] == str(source) and started["init"]["with_backbone"] is False
    assert f'pretrained_backbone = "{tmp_path / "resnet18.pth"}"' in (tmp_path / "run" / "config.toml").read_text()
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pth")["model"]
    assert torch.equal(state["backbone.0.body.layer1.0.bn1.running_mean"], weights["layer1.0.bn1.running_mean"])


def test_a_config_file_with_a_byte_order_mark_is_read(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(finished)
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[train]\nepochs = 3\n".encode())
    result = runner.invoke(
        app, ["train", "--preset", "tiny", "--data", "synth", "--config", str(path), "--print-config"]
    )
    text = ok(result)
    assert "epochs = 3" in text


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train]\nepochs = = 3\n")
    result = runner.invoke(app, ["train", "--preset", "tiny", "--config", str(path), "--print-config"])
    one_line(result, 2, f"{path} is not valid TOML", "line 2")


# -- data, settings, checkpoints and the zoo ----------------------------------------------------------------


SYNTH = ["--num-train", "2", "--num-val", "1", "--image-size", "48"]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    """Four training and two validation images of 96 pixels."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("small_synth"), num_train=4, num_val=2, image_size=96)


def test_data_synth_replaces_only_its_own_dataset_and_only_with_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["data", "synth", "--out", "d", *SYNTH]).exit_code == 0
    result = runner.invoke(app, ["data", "synth", "--out", "d", *SYNTH])
    assert result.exit_code == 0 and "left as is" in result.output
    one_line(runner.invoke(app, ["data", "synth", "--out", "d", *SYNTH, "--seed", "1"]), 2,
             "d holds another synthetic dataset: pass --force")  # fmt: skip
    result = runner.invoke(app, ["data", "synth", "--out", "d", *SYNTH, "--seed", "1", "--force"])
    assert result.exit_code == 0 and json.loads((tmp_path / "d" / "synthetic.json").read_text())["seed"] == 1

    for mine in (tmp_path / "d" / "notes.txt", tmp_path / "d" / "train" / "my_photo.png"):
        mine.write_text("keep me")
        one_line(runner.invoke(app, ["data", "synth", "--out", "d", *SYNTH, "--force"]), 2,
                 "1 other file(s)", str(mine.relative_to(tmp_path)), "never deleted")  # fmt: skip
        assert mine.read_text() == "keep me" and (tmp_path / "d" / "train" / "000000.png").is_file()
        mine.unlink()

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "thesis.tex").write_text("keep me")
    one_line(runner.invoke(app, ["data", "synth", "--out", "own", *SYNTH, "--force"]), 2,
             "own exists and is not a synthetic dataset folder")  # fmt: skip
    assert (tmp_path / "own" / "thesis.tex").read_text() == "keep me"
    one_line(runner.invoke(app, ["data", "synth", "--out", "own/thesis.tex", *SYNTH]), 2, "is a file")
    one_line(runner.invoke(app, ["data", "synth", "--out", "big", "--image-size", "10000000"]), 2,
             f"image_size must be from 32 to {MAX_IMAGE_SIZE}")  # fmt: skip
    assert not (tmp_path / "big").exists()


def test_the_builtin_dataset_still_rewrites_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SDETR_DATA_DIR", str(tmp_path / "cache" / "shapes"))
    out = make_synthetic_dataset(None, 2, 1, 48)
    assert out == tmp_path / "cache" / "shapes" and len(list((out / "train").glob("*.png"))) == 2
    make_synthetic_dataset(None, 3, 1, 48)  # the cache of another version: replaced without asking
    assert len(list((out / "train").glob("*.png"))) == 3


def test_16_bit_32_bit_and_float_gray_images_are_scaled_like_16_bit_pngs(tmp_path):
    values = np.array([[0, 255, 256, 1000, 40000, 65535]])
    expected = values // 256  # the I;16 PNG rule: the top 8 of 16 bits
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(values.astype(np.int32), mode="I").save(tmp_path / "gray32.tif")
    Image.fromarray(values.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    for name, mode in (("gray16.png", None), ("gray32.tif", "I"), ("float.tif", "F")):
        if mode is not None:
            assert Image.open(tmp_path / name).mode == mode
        rgb = np.asarray(load_rgb_image(tmp_path / name))
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 6, 3)
        assert (rgb == expected[..., None]).all(), (name, rgb[..., 0])

    # beyond the 16-bit range: clipped; a float image within [0, 1] holds normalized intensities
    Image.fromarray(np.array([[-5, 70000, 2**31 - 1]], dtype=np.int32), mode="I").save(tmp_path / "wide.tif")
    assert np.asarray(load_rgb_image(tmp_path / "wide.tif"))[..., 0].tolist() == [[0, 255, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "unit.tif")
    assert np.asarray(load_rgb_image(tmp_path / "unit.tif"))[..., 0].tolist() == [[0, 128, 255]]


@pytest.mark.parametrize(
    ("section", "field", "value", "fragment"),
    [
        ("annotations", "id", "7", "'annotations' entry #0 has id '7'; each needs an integer id"),
        ("annotations", "area", "big", "'annotations' entry #0 (id 1) has area 'big'; each needs an area"),
        ("annotations", "area", -3.0, "'annotations' entry #0 (id 1) has area -3.0"),
        ("annotations", "iscrowd", "no", "'annotations' entry #0 (id 1) has iscrowd 'no'; each needs iscrowd 0 or 1"),
        ("annotations", "image_id", "1", "'annotations' entry #0 (id 1) has image_id '1'"),
        ("images", "id", "1", "'images' entry #0 has id '1'; each needs an integer id"),
        ("images", "width", "640", "'images' entry #0 (id 1) has width '640'; each needs a positive width"),
        ("categories", "name", 3, "'categories' entry #0 (id 1) has name 3; each needs a string name"),
        ("categories", "id", "1", "'categories' entry #0 has id '1'"),
    ],
)
def test_fields_of_the_wrong_type_name_file_section_entry_and_field(
    small_synth, tmp_path, section, field, value, fragment
):
    path = copy_dataset(small_synth, tmp_path) / "annotations" / "instances_val.json"
    edit_annotations(path, lambda data: data[section][0].update({field: value}))
    for bad_boxes in ("error", "drop"):
        with pytest.raises(AnnotationFileError) as raised:
            load_coco_annotations(path, bad_boxes)
        assert str(raised.value).startswith(f"{path}: ") and fragment in str(raised.value)


def test_fields_of_the_wrong_type_are_one_line_in_train_and_eval(small_synth, tmp_path):
    data = copy_dataset(small_synth, tmp_path)
    edit_annotations(data / "annotations" / "instances_val.json", lambda d: d["annotations"][0].update(area="big"))
    checkpoint = synth_checkpoint(tmp_path / "model.pth")
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--workers", "0"])
    one_line(result, 1, "instances_val.json: 'annotations' entry #0 (id 1) has area 'big'")
    edit_annotations(data / "annotations" / "instances_train.json", lambda d: d["images"][0].update(width="640"))
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *ONE_STEP, "--output-dir", "x"])
    one_line(result, 1, "instances_train.json: 'images' entry #0 (id 1) has width '640'")


@pytest.mark.parametrize(
    "bbox", ["1,2,3,4", ["1", "2", "3", "4"], [1, 2, 3], None, [1, 1, -4, 5], [1, 1, math.nan, 5]]
)  # fmt: skip
def test_malformed_training_boxes_are_dropped_and_evaluation_boxes_refused(small_synth, tmp_path, bbox):
    data = copy_dataset(small_synth, tmp_path)
    train_ann, val_ann = data / "annotations" / "instances_train.json", data / "annotations" / "instances_val.json"
    for path in (train_ann, val_ann):
        edit_annotations(path, lambda d: d["annotations"][0].update(bbox=bbox, id=4242))
    with pytest.warns(UserWarning, match=r"instances_train\.json: dropped 1 of \d+ annotations: .*annotation id 4242"):
        dataset = CocoDetection(data / "train", train_ann, train=True)
    assert 4242 not in dataset.coco.anns and len(dataset.coco.anns) > 0
    with pytest.raises(AnnotationFileError, match=r"instances_val\.json: annotation id 4242 has a bbox .* AP"):
        CocoDetection(data / "val", val_ann)


def test_a_training_run_goes_on_past_malformed_boxes(small_synth, tmp_path):
    data = copy_dataset(small_synth, tmp_path)
    boxes = ([1, 2, 3], "1 2 3 4", ["1", "2", "3", "4"])
    edit_annotations(
        data / "annotations" / "instances_train.json",
        lambda d: [annotation.update(bbox=box) for annotation, box in zip(d["annotations"], boxes)],
    )
    with pytest.warns(UserWarning, match=r"instances_train\.json: dropped 3 of \d+ annotations: 3 that is not \["):
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *ONE_STEP,
                                     "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint.pth").is_file()


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--lr", "inf"], "train.lr must be a positive finite number, got inf"),
        (["--lr", "0"], "train.lr must be a positive finite number, got 0.0"),
        (["--lr-backbone", "-1e-4"], "train.lr_backbone must be a positive finite number, got -0.0001"),
        (["--set", "train.lr=nan"], "--set train.lr must be a positive finite number, got nan"),
        (["--set", "train.lr_linear_proj_mult=0"], "--set train.lr_linear_proj_mult must be a positive finite"),
        (["--set", "model.num_queries=0"], "--set model.num_queries must be from 1 to 10000, got 0"),
        (["--set", "model.num_queries=-5"], "--set model.num_queries must be from 1 to 10000, got -5"),
        (["--set", "model.num_classes=0"], "--set model.num_classes must be at least 1, got 0"),
        (["--set", "model.num_feature_levels=0"], "--set model.num_feature_levels must be at least 3, got 0"),
        (["--set", "model.nheads=0"], "--set model.nheads must be at least 1, got 0"),
        (["--set", "model.enc_n_points=0"], "--set model.enc_n_points must be at least 1, got 0"),
        (["--set", "model.dec_n_points=0"], "--set model.dec_n_points must be at least 1, got 0"),
        (["--set", "model.dec_layers=0"], "--set model.dec_layers must be at least 1, got 0"),
        (["--set", f"train.image_size={10**7}"], f"--set train.image_size must be from 1 to {MAX_IMAGE_SIZE}"),
        (["--set", "model.keep_ratio=1.5"], "--set model.keep_ratio must be a number in [0, 1]"),
        (["--rho", "-0.1"], "model.keep_ratio must be a number in [0, 1] (0: every token encoded), got -0.1"),
        (["--set", "train.weight_decay=-1"], "--set train.weight_decay must be a finite number >= 0"),
        (["--set", "loss.cls_loss_coef=inf"], "--set loss.cls_loss_coef must be a finite number >= 0, got inf"),
        (["--seed", "-1"], "train.seed must be from 0 to 4294967295, got -1"),
    ],
)
def test_settings_out_of_range_stop_before_anything_runs(small_synth, tmp_path, monkeypatch, arguments, fragment):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["train", "--preset", "tiny", "--data", str(small_synth), *arguments, "--output-dir", "out"]
    )
    one_line(result, 2, fragment)
    assert not (tmp_path / "out").exists()


def test_settings_out_of_range_in_a_config_file_name_the_file(small_synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for table, line, fragment in [
        ("train", "lr = inf", "run.toml: train.lr must be a positive finite number, got inf"),
        ("train", "lr_backbone = -2e-5", "run.toml: train.lr_backbone must be a positive finite number"),
        ("train", f"image_size = {10**7}", f"run.toml: train.image_size must be from 1 to {MAX_IMAGE_SIZE}"),
        ("model", "num_queries = 0", "run.toml: model.num_queries must be from 1 to 10000, got 0"),
        ("model", "keep_ratio = nan", "run.toml: model.keep_ratio must be a number in [0, 1]"),
    ]:
        (tmp_path / "run.toml").write_text(f'preset = "tiny"\n[{table}]\n{line}\n')
        result = runner.invoke(
            app, ["train", "--config", "run.toml", "--data", str(small_synth), "--output-dir", "out"]
        )
        one_line(result, 2, fragment)
        assert not (tmp_path / "out").exists()


def test_the_python_api_checks_the_same_ranges():
    with pytest.raises(ConfigError, match=r"^lr must be a positive finite number, got nan$"):
        TrainConfig(lr=math.nan)
    with pytest.raises(ConfigError, match=rf"^image_size must be from 1 to {MAX_IMAGE_SIZE}, got 10000000$"):
        TrainConfig(image_size=10**7)
    with pytest.raises(ConfigError, match=r"^num_queries must be from 1 to 10000, got 0$"):
        ModelConfig(num_queries=0)
    with pytest.raises(ConfigError, match=r"^num_queries must be an integer, got 'x'$"):
        ModelConfig(num_queries="x")
    assert TrainConfig(backbone_names=["a"]).backbone_names == ("a",)


@pytest.mark.parametrize(("value", "dense", "ok"), [(0.1, False, True), (1, False, True), (0, True, True),
                                                      (0, False, False), (1.01, True, False), (math.nan, True, False),
                                                      ("0.3", False, False), (True, False, False)])  # fmt: skip
def test_one_keep_ratio_rule(value, dense, ok):
    if ok:
        assert check_keep_ratio(value, "--rho", dense=dense) == float(value)
    else:
        with pytest.raises(ConfigError, match=r"^--rho must be a number in [\[(]0, 1\]"):
            check_keep_ratio(value, "--rho", dense=dense)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda c: c["config"]["model"].update(num_queries="x"), ["model.num_queries must be an integer, got 'x'"]),
        (lambda c: c["config"]["model"].update(num_queries=-5), ["model.num_queries must be from 1 to 10000"]),
        (lambda c: c["config"]["model"].update(keep_ratio=7), ["model.keep_ratio must be a number in [0, 1]"]),
        (lambda c: c["config"].update(model="x"), ["model must be a table of fields, got 'x'"]),
        (lambda c: c["train_config"].update(image_size=0), ["train_config.image_size must be from 1 to"]),
        (lambda c: c["train_config"].update(image_size="x"), ["train_config.image_size must be an integer"]),
        (lambda c: c.update(version=2), ["written by a newer sparse_detr (checkpoint format version 2", "upgrade"]),
        (lambda c: c["categories"].update({3: {"id": "a", "name": 3}}), ["'categories' must map", "entry 3 is"]),
        (lambda c: c.update(categories=["circle"]), ["'categories' must map class label"]),
    ],
    ids=["queries-type", "queries-negative", "keep-ratio", "model-table", "image-size-0", "image-size-type",
         "newer-version", "category-entry", "categories-list"],
)  # fmt: skip
def test_absurd_stored_settings_are_one_line_naming_the_file(small_synth, tmp_path, edit, fragments):
    content = read_checkpoint(synth_checkpoint(tmp_path / "good.pth"))
    edit(content)
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    result = runner.invoke(app, ["eval", "--checkpoint", str(path), "--data", str(small_synth), "--workers", "0"])
    one_line(result, 1, str(path), *fragments)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(path)


def _official_args(**changes) -> argparse.Namespace:
    model = get_preset("tiny").model
    args = {name: getattr(model, name) for name in OFFICIAL_ARGS}
    return argparse.Namespace(**{**args, "backbone": "resnet10t", "rho": model.keep_ratio, **changes})


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"num_queries": "x"}, "args.num_queries must be an integer, got 'x'"),
        ({"num_queries": -5}, "args.num_queries must be from 1 to 10000, got -5"),
        ({"hidden_dim": 64.0}, "args.hidden_dim must be an integer, got 64.0"),
        ({"two_stage": "yes"}, "args.two_stage must be true or false, got 'yes'"),
        ({"rho": "0.3"}, "args.rho must be a number in [0, 1] (0: every token encoded), got '0.3'"),
        ({"rho": 5}, "args.rho must be a number in [0, 1]"),
        ({"backbone": 50}, "args.backbone must be a string, got 50"),
    ],
)
def test_released_files_with_absurd_arguments_name_the_file_and_key(small_synth, tmp_path, changes, fragment):
    path = tmp_path / "released.pth"
    torch.save({"model": {}, "args": _official_args(**changes)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert str(raised.value).startswith(f"{path} stores arguments this model cannot be built from: ")
    assert fragment in str(raised.value)
    result = runner.invoke(app, ["eval", "--checkpoint", str(path), "--data", str(small_synth), "--workers", "0"])
    one_line(result, 1, str(path), fragment)


SMALL = zoo.ZooEntry("small-rho0.2", "small_20.pth", "tiny", "resnet10t", "imagenet", 0.2, 0.0, 0.0, 0.0, 0.0)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A ``file://`` mirror serving a small released-like file under SMALL's name, and an empty cache."""
    tiny = get_preset("tiny").model
    model = ModelConfig(backbone="resnet10t", keep_ratio=0.2, **{name: getattr(tiny, name) for name in OFFICIAL_ARGS})
    state = build_model(Config(name="official", model=model)).state_dict()
    folder, cache = tmp_path / "mirror", tmp_path / "cache"
    folder.mkdir()
    torch.save({"model": state, "args": _official_args(rho=0.2)}, folder / SMALL.file_name)
    monkeypatch.setenv("SDETR_ZOO_URL", folder.as_uri())
    monkeypatch.setenv("SDETR_ZOO_DIR", str(cache))
    monkeypatch.setitem(zoo.ZOO, SMALL.name, SMALL)
    return folder, cache


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("sparse-detr-r50-rho0.15", "sparse-detr-r50-rho0.1 or sparse-detr-r50-rho0.5"),
        ("sparse-detr-r50-rh0.1", "sparse-detr-r50-rho0.1"),
        ("sparse-detr-swin-t-rho0.3", "sparse-detr-swint-rho0.3"),
    ],
)
def test_a_mistyped_zoo_name_gets_a_guess(small_synth, tmp_path, monkeypatch, name, guess):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", "--checkpoint", name, "--data", str(small_synth)])
    one_line(result, 1, f"checkpoint not found: {name}", f"did you mean {guess}? `sdetr zoo` lists the names")


def test_a_cached_zoo_file_that_changed_is_refused(small_synth, mirror):
    _, cache = mirror
    path = zoo.fetch_checkpoint(SMALL.name, progress=False)
    record = cache / (SMALL.file_name + zoo.RECORD_SUFFIX)
    assert record.read_text().split() == [file_sha256(path), SMALL.file_name]
    assert zoo.fetch_checkpoint(SMALL.name, progress=False) == path  # verified, not downloaded again

    content = torch.load(path, weights_only=False)
    content["model"]["class_embed.0.bias"] = content["model"]["class_embed.0.bias"] + 1  # still loads
    torch.save(content, path)
    with pytest.raises(CheckpointError) as raised:
        zoo.fetch_checkpoint(SMALL.name, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{path}, the cached zoo checkpoint {SMALL.name}, changed since it was downloaded")
    assert message.endswith(f"delete {path} and run again to download it anew") and "\n" not in message
    result = runner.invoke(app, ["eval", "--checkpoint", SMALL.name, "--data", str(small_synth), "--workers", "0"])
    one_line(result, 1, "changed since it was downloaded and checked", f"delete {path}")

    path.unlink()  # as the message says: downloaded and recorded anew
    assert zoo.fetch_checkpoint(SMALL.name, progress=False) == path
    assert record.read_text().split()[0] == file_sha256(path)


def test_a_cached_zoo_file_without_a_record_is_checked_then_recorded(mirror):
    folder, cache = mirror
    cache.mkdir()
    shutil.copy(folder / SMALL.file_name, cache / SMALL.file_name)  # cached by an older version
    assert zoo.fetch_checkpoint(SMALL.name, progress=False) == cache / SMALL.file_name
    assert (cache / (SMALL.file_name + zoo.RECORD_SUFFIX)).is_file()

    (cache / SMALL.file_name).write_bytes(b"<html>not found</html>")
    (cache / (SMALL.file_name + zoo.RECORD_SUFFIX)).unlink()
    with pytest.raises(CheckpointError, match=rf"is not the released checkpoint small-rho0\.2: the file is not a .*"
                                              rf"delete {cache / SMALL.file_name} and run again"):  # fmt: skip
        zoo.fetch_checkpoint(SMALL.name, progress=False)


def test_an_unwritable_zoo_cache_names_the_folder_and_the_variable(small_synth, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache's parent would be")
    monkeypatch.setenv("SDETR_ZOO_DIR", str(tmp_path / "file" / "zoo"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("nothing is downloaded"))
    with pytest.raises(OutputError, match=r"cannot write to the cache folder .*file/zoo .*set SDETR_ZOO_DIR"):
        zoo.fetch_checkpoint("sparse-detr-r50-rho0.1", progress=False)
    one_line(runner.invoke(app, ["eval", "--checkpoint", "sparse-detr-r50-rho0.1", "--data", str(small_synth)]), 1,
             f"cannot write to the cache folder {tmp_path / 'file' / 'zoo'}", "set SDETR_ZOO_DIR")  # fmt: skip


@pytest.mark.parametrize("home", ["SDETR_CACHE_DIR", "HOME"])
def test_an_unwritable_home_for_the_builtin_dataset_names_the_folder_and_the_variable(tmp_path, monkeypatch, home):
    (tmp_path / "file").write_text("a file where the home folder would be")
    for variable in ("SDETR_DATA_DIR", "SDETR_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(home, str(tmp_path / "file" / "home"))
    folder = user_cache_dir() / "synthetic-shapes"
    assert str(folder).startswith(str(tmp_path / "file" / "home"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *ONE_STEP, "--output-dir", "run"])
    one_line(result, 1, f"cannot write to the cache folder {folder}", "set SDETR_DATA_DIR (or SDETR_CACHE_DIR")
    with pytest.raises(SparseDetrError, match="SDETR_DATA_DIR"):
        make_synthetic_dataset(None, 2, 1, 48)


# -- evaluation, prediction, export and benchmark -----------------------------------------------------------


TABLE_LINE = "(AP50)"  # the project's COCO table has one such line


PYCOCOTOOLS_LINE = "Average Precision  (AP) @["  # pycocotools' own summarize() print


@pytest.fixture(scope="module")
def eval_synth(tmp_path_factory):
    """Two training and three validation images of 96 pixels."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("eval_synth"), num_train=2, num_val=3, image_size=96)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return synth_checkpoint(tmp_path_factory.mktemp("model") / "model.pth")


def test_a_model_with_nan_outputs_stops_eval_predict_and_visualize(eval_synth, tmp_path):
    broken = synth_checkpoint(tmp_path / "diverged.pth", nan=True)
    eval_dir = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--checkpoint", str(broken), "--data", str(eval_synth), "--workers", "0",
                                 "--output-dir", str(eval_dir)])  # fmt: skip
    one_line(result, 1, "diverged.pth", "not finite")
    assert not list(eval_dir.glob("eval_*.json"))  # no AP 0.0 on record

    out = tmp_path / "detections.json"
    result = runner.invoke(app, ["predict", str(eval_synth / "val"), "--checkpoint", str(broken), "--out", str(out)])
    one_line(result, 1, "diverged.pth", "not finite")
    assert not out.exists()  # no file of 0 detections

    figures = tmp_path / "figures"
    image = sorted((eval_synth / "val").glob("*.png"))[0]
    result = runner.invoke(app, ["visualize", str(image), "--checkpoint", str(broken), "--out", str(figures)])
    one_line(result, 1, "diverged.pth", "not finite")
    assert not list(figures.glob("*.png"))


@pytest.fixture(scope="module")
def broken_val(eval_synth, tmp_path_factory):
    """``eval_synth`` with its first validation image unreadable; returns the folder and that image's id."""
    data = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(eval_synth, data)
    coco = json.loads((data / "annotations" / "instances_val.json").read_text())
    first = min(coco["images"], key=lambda image: image["file_name"])
    (data / "val" / first["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return data, first["id"]


@pytest.fixture(scope="module")
def trained(broken_val, tmp_path_factory):
    data, _ = broken_val
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.warns(UserWarning, match="could not be evaluated"):
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), *ONE_STEP,
                                     "--output-dir", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_and_eval_print_the_coco_table_once(trained, broken_val, tmp_path):
    run, output = trained
    assert output.count(TABLE_LINE) == 1, output
    assert PYCOCOTOOLS_LINE not in output
    data, _ = broken_val
    with pytest.warns(UserWarning, match="could not be evaluated"):
        result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--data", str(data), "--workers", "0",
                                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count(TABLE_LINE) == 1 and PYCOCOTOOLS_LINE not in result.output


def test_metrics_files_record_the_images_left_out(trained, broken_val, checkpoint, tmp_path):
    run, _ = trained
    data, bad_id = broken_val
    for name in ("eval_epoch1.json", "metrics_final.json"):
        stored = json.loads((run / name).read_text())
        assert stored["images_skipped"] == 1 and stored["skipped_image_ids"] == [bad_id], name
    with pytest.warns(UserWarning, match="1 of 3 images could not be evaluated"):
        result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--workers", "0",
                                     "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "eval_model.json").read_text())
    assert stored["images_skipped"] == 1 and stored["skipped_image_ids"] == [bad_id]
    detections = json.loads((tmp_path / "detections_model.json").read_text())
    assert bad_id not in {detection["image_id"] for detection in detections}


def test_a_clean_split_records_that_no_image_was_left_out(eval_synth, checkpoint, tmp_path):
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(eval_synth), "--workers", "0",
                                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "eval_model.json").read_text())
    assert stored["images_skipped"] == 0 and stored["skipped_image_ids"] == []


def test_an_image_size_too_small_for_the_queries_is_named_up_front(eval_synth, checkpoint, tmp_path):

    model = load_model(checkpoint)
    enough = next(size for size in range(16, 400) if encoder_tokens(model, size, size) >= 20)
    assert enough > 16
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(eval_synth), "--workers", "0",
                                 "--image-size", "16", "--output-dir", str(tmp_path)])  # fmt: skip
    line = one_line(result, 2, "--image-size 16", "fewer than its 20 queries", f"--image-size {enough} or more")
    assert "missing" not in line and not list(tmp_path.glob("*.json"))
    result = runner.invoke(app, ["predict", str(eval_synth / "val"), "--checkpoint", str(checkpoint), "--image-size",
                                 "16", "--out", str(tmp_path / "d.json")])  # fmt: skip
    one_line(result, 2, "--image-size 16", f"--image-size {enough} or more")
    # the size named is enough: every image is evaluated at it (the token count is the model's own)
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(eval_synth), "--workers", "0",
                                 "--image-size", str(enough), "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval_model.json").read_text())["images_skipped"] == 0


def _records_access_times(folder: Path) -> bool:
    """Whether reading a file there updates its access time (relatime does when it is older than the
    modification time; a noatime mount never does)."""
    probe = folder / "probe"
    probe.write_bytes(b"x")
    stat = probe.stat()
    os.utime(probe, (stat.st_mtime - 2 * 86400, stat.st_mtime))
    probe.read_bytes()
    recorded = probe.stat().st_atime > stat.st_mtime - 86400
    probe.unlink()
    return recorded


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_predict_writes_what_finished_and_says_what_did_not(tmp_path, signum, code):
    images = tmp_path / "images"
    images.mkdir()
    if not _records_access_times(images):
        pytest.skip("this file system does not record access times: nothing tells when an image was read")
    paths = [images / f"{index:04d}.png" for index in range(400)]
    for index, path in enumerate(paths):
        Image.new("RGB", (64, 64), (index % 256, 80, 160)).save(path)
        mtime = path.stat().st_mtime
        os.utime(path, (mtime - 2 * 86400, mtime))  # read -> the access time moves (relatime)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "detections.json"
    arguments = ["predict", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--threshold", "0",
                 "--device", "cpu"]  # fmt: skip

    def second_image_read() -> bool:  # so the first image is done
        return paths[1].stat().st_atime >= paths[1].stat().st_mtime - 86400

    error = signalled_sdetr(arguments, second_image_read, "predict never reached the second image", signum, code,
                            poll=0.002)  # fmt: skip
    finished = sorted({Path(result["file_name"]).name for result in json.loads(out.read_text())})
    count = len(finished)
    assert 1 <= count < len(paths) and finished == [path.name for path in paths[:count]]
    assert f"wrote the detections of {count} of {len(paths)} images to {out}" in error
    assert f"the other {len(paths) - count}, from {paths[count]} on, were not run" in error
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupt_before_the_first_image_says_nothing_was_written(tmp_path, monkeypatch):
    from sparse_detr import inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "load_predictor", interrupted)
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    out = tmp_path / "detections.json"
    result = runner.invoke(app, ["predict", str(image), "--checkpoint", str(image), "--out", str(out)])
    one_line(result, 130, "interrupted before the first image finished: nothing was written")
    assert not out.exists()


@pytest.mark.parametrize("opset", ["7", "17", "99"])
def test_an_unusable_opset_is_refused_before_anything_is_written(tmp_path, opset):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from sparse_detr.export import supported_opsets

    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", "missing.pth", "--out", str(out), "--opset", opset])
    opsets = supported_opsets()
    one_line(result, 2, f"--opset {opset} is not supported", f"give {opsets[0]} to {opsets[-1]}")
    assert not list(tmp_path.iterdir())


def test_an_export_that_fails_its_check_leaves_no_file(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")

    def invalid_program(*args, opset_version, **kwargs):  # what torch writes when the graph is broken
        model = SimpleNamespace(metadata_props={}, opset_imports={"": opset_version})
        return SimpleNamespace(model=model, save=lambda path, external_data: Path(path).write_bytes(b"not onnx"))

    monkeypatch.setattr(torch.onnx, "export", invalid_program)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pth")
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--no-check"])
    one_line(result, 1, f"{out} is not a valid ONNX model")
    assert not out.exists() and not list(tmp_path.glob(".*"))
    out.write_bytes(b"an earlier export")
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--force"])
    one_line(result, 1, f"{out} is not a valid ONNX model")
    assert out.read_bytes() == b"an earlier export" and not list(tmp_path.glob(".*"))


GOOD_METADATA = {
    "checkpoint": "tiny.pth", "image_size": 64, "num_classes": 4, "keep_ratio": 0.3, "postprocess": False,
    "opset": 18, "categories": {str(label): entry for label, entry in TINY_CATEGORIES.items()},
}  # fmt: skip


def constant_detector(path: Path, metadata: str | None) -> Path:
    """A small ONNX file with an exported detector's inputs and outputs (``pred_logits`` (N, 5, 4) with
    class 1 on top, ``pred_boxes`` (N, 5, 4) a centred box) and ``metadata`` under the ``sparse_detr`` key:
    what ``sdetr predict --onnx`` reads, without a minute of export."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    logits = torch.full((1, 5, 4), -5.0)
    logits[0, :, 1] = torch.linspace(3.0, 1.0, 5)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3]]).repeat(5, 1)[None]
    constants = {"logits": logits, "boxes": boxes, "logit_dims": torch.tensor([5, 4]), "box_dims": torch.tensor([5, 4])}
    nodes = [
        helper.make_node("Shape", ["images"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "logit_dims"], ["logits_shape"], axis=0),
        helper.make_node("Concat", ["batch", "box_dims"], ["boxes_shape"], axis=0),
        helper.make_node("Expand", ["logits", "logits_shape"], ["pred_logits"]),
        helper.make_node("Expand", ["boxes", "boxes_shape"], ["pred_boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "constant_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", "H", "W"])],
        [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, ["N", 5, 4]),
         helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["N", 5, 4])],
        [numpy_helper.from_array(value.numpy(), name) for name, value in constants.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    if metadata is not None:
        helper.set_model_props(model, {"sparse_detr": metadata})
    onnx.save(model, str(path))
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (80, 64), (120, 90, 60)).save(path)
    return path


def test_a_well_formed_file_gives_boxes_of_positive_size(tmp_path, image):
    onnx_file = constant_detector(tmp_path / "good.onnx", json.dumps(GOOD_METADATA))
    out = tmp_path / "detections.json"
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(onnx_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    detections = json.loads(out.read_text())
    assert detections and all(d["bbox"][2] > 0 and d["bbox"][3] > 0 for d in detections)
    assert {d["category_name"] for d in detections} == {"disc"}


def _forged(**changes):
    return json.dumps({key: value for key, value in {**GOOD_METADATA, **changes}.items() if value is not ...})


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "no 'sparse_detr' metadata"),
        ('{"image_size": 64,', "metadata is not valid JSON"),
        ("[64, 0.3]", "metadata is not a JSON object"),
        (_forged(categories=...), "metadata has no 'categories'"),
        (_forged(image_size=...), "metadata has no 'image_size'"),
        (_forged(keep_ratio=...), "metadata has no 'keep_ratio'"),
        (_forged(image_size=0), "'image_size' must be a whole number of pixels from 16"),
        (_forged(image_size=-64), "'image_size' must be a whole number of pixels from 16"),
        (_forged(image_size="64"), "'image_size' must be a whole number of pixels from 16"),
        (_forged(image_size=10**9), "'image_size' must be a whole number of pixels from 16"),
        (_forged(keep_ratio=-0.5), "'keep_ratio' must be a number in [0, 1]"),
        (_forged(num_classes=0), "'num_classes' must be a positive whole number"),
        (_forged(categories=[]), "'categories' must map class labels to categories"),
        (_forged(categories={"1": {"id": "11", "name": "disc"}}), "'categories' entry '1'"),
        (_forged(categories={"9": {"id": 11, "name": "disc"}}), "'categories' entry '9'"),
        (_forged(categories={"x": {"id": 11, "name": "disc"}}), "'categories' entry 'x'"),
        (_forged(categories={"1": {"id": 11, "name": "a"}, "2": {"id": 11, "name": "b"}}), "'categories' entry '2'"),
        (_forged(postprocess=True), "'postprocess' is True, but the graph does not end in post-processing"),
    ],
)
def test_malformed_onnx_metadata_is_one_line_naming_file_and_key(tmp_path, image, metadata, fragment):
    onnx_file = constant_detector(tmp_path / "forged.onnx", metadata)
    out = tmp_path / "detections.json"
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(onnx_file), "--out", str(out)])
    one_line(result, 1, str(onnx_file), fragment)
    assert not out.exists()


@pytest.mark.slow
def test_forged_metadata_of_a_real_export_is_refused(tmp_path, image):
    """The same check on a file `sdetr export` wrote (its metadata rewritten with onnx)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pth")
    exported = tmp_path / "tiny.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(exported), "--no-check"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(exported))
    entry = next(prop for prop in model.metadata_props if prop.key == "sparse_detr")
    entry.value = json.dumps({**json.loads(entry.value), "image_size": 0})
    onnx.save(model, str(exported))
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(exported), "--out", str(tmp_path / "d.json")])
    one_line(result, 1, str(exported), "'image_size' must be a whole number of pixels from 16", "got 0")


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--input-size", "100000x100000"], "--input-size 100000x100000 in batches of 4 (--batch-sizes)"),
        (["--batch-sizes", "1,1000000"], "--input-size 850x1040 in batches of 1000000 (--batch-sizes)"),
        (["--images", "1", "--image-size", "8000", "--batch-sizes", "1000"], "--image-size 8000 in batches of 1000"),
    ],
)
def test_benchmark_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, arguments, fragment):
    folder = tmp_path / "report"
    result = runner.invoke(app, ["benchmark", "--preset", "tiny", "--device", "cpu", *arguments, "--output",
                                 str(folder)])  # fmt: skip
    one_line(result, 2, fragment, "GiB (100 bytes per input pixel), more than the", "GiB this machine has")
    assert not folder.exists() or not list(folder.iterdir())


def test_benchmark_sizes_that_fit_pass_the_memory_check():
    check_fits((850, 1040), 4, "--input-size 850x1040", torch.device("cpu"))  # 0.3 GiB
    with pytest.raises(SparseDetrError, match="--input-size 1x1"):
        check_fits((1, 1), 2**60, "--input-size 1x1", torch.device("cpu"))


# -- the compiled op's cache --------------------------------------------------------------------------------


# the op on the CPU with the default backend, twice, checked against the reference; prints the warnings and backend
OP_CALL = textwrap.dedent(
    """
    import warnings, torch
    from sparse_detr.ops import load_backend, ms_deform_attn, ms_deform_attn_pytorch
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, 6, 2, 4, dtype=torch.float64, generator=generator)
    shapes, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    locations = torch.rand(1, 5, 2, 1, 3, 2, dtype=torch.float64, generator=generator)
    weights = torch.rand(1, 5, 2, 1, 3, dtype=torch.float64, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = ms_deform_attn(value, shapes, starts, locations, weights)
        ms_deform_attn(value, shapes, starts, locations, weights)
    torch.testing.assert_close(output, ms_deform_attn_pytorch(value, shapes, starts, locations, weights))
    for warning in caught:
        print("warning:", " ".join(str(warning.message).split()))
    print("backend:", "cpu" if load_backend("cpu").available else "pytorch")
    """
)


def _environment(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("TORCH_EXTENSIONS_DIR", "CXX")}
    env.update(SDETR_OP_BACKEND="", COLUMNS="200", **variables)
    env.pop("SDETR_DEBUG", None)
    return env


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` in a child process, checked to end normally (no signal, no traceback)."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def op_call(env: dict[str, str]) -> tuple[list[str], str]:
    """Run :data:`OP_CALL`: the sparse_detr warnings it printed and the backend that ran."""
    lines = _run([sys.executable, "-c", OP_CALL], env).stdout.splitlines()
    warnings = [line for line in lines if line.startswith("warning:") and "sparse_detr" in line]
    backend = next(line.split()[-1] for line in lines if line.startswith("backend:"))
    return warnings, backend


def doctor(env: dict[str, str]) -> tuple[list[str], str]:
    """Run ``sdetr doctor``: its warning lines and its output with whitespace collapsed (the table wraps)."""
    result = _run([str(SDETR), "doctor"], env)
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("warning:")]
    return warnings, " ".join(result.stdout.replace("│", " ").split())


def cached_library(root: Path) -> Path:
    (library,) = root.glob("sparse_detr/cpu-*/sparse_detr_msda_cpu.so")
    return library


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A kernel cache (a ``TORCH_EXTENSIONS_DIR``) holding the CPU kernels built here, with their build record."""
    root = tmp_path_factory.mktemp("kernels")
    build = "from sparse_detr.ops import load_backend; status = load_backend('cpu'); assert status.available, status"
    _run([sys.executable, "-c", build], _environment(TORCH_EXTENSIONS_DIR=str(root)))
    return root


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    """A copy of :func:`built_cache` for one test to damage."""
    return Path(shutil.copytree(built_cache, tmp_path / "kernels"))


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` and all in it made read-only for the ``with`` block; skips the test where that cannot be done."""
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(0o555)
    if _writable(folder):  # root, whom permissions do not stop: the immutable attribute does
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True)
    try:
        if _writable(folder):
            pytest.skip("cannot make a folder read-only here")
        yield folder
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
        for path in paths:
            path.chmod(0o755)


def test_a_library_that_does_not_match_its_record_is_never_loaded(tmp_path, monkeypatch):
    library = tmp_path / "sparse_detr_msda_cpu.so"
    library.write_bytes(b"\x7fELF not a library")
    (tmp_path / "sparse_detr_msda_cpu.json").write_text(
        json.dumps({"library": library.name, "sha256": "0" * 64, "bytes": 1})
    )

    def no_child(*args, **kwargs):
        raise AssertionError("a library with a build record is judged by its hash alone")

    monkeypatch.setattr(loader, "_loads_in_child", no_child)
    assert loader.cached_library_damage("cpu", library) == "damaged (hash mismatch)"


@pytest.mark.slow
def test_a_truncated_library_is_rebuilt_and_doctor_says_so(cache):
    """A truncated library raises SIGBUS in the process that maps it: it must never be mapped."""
    library = cached_library(cache)
    os.truncate(library, library.stat().st_size // 3)
    env = _environment(TORCH_EXTENSIONS_DIR=str(cache))
    warnings, text = doctor(env)
    assert len(warnings) == 1 and f"{library} is damaged (hash mismatch); rebuilding it" in warnings[0], warnings
    assert "cpu yes cached library damaged (hash mismatch): rebuilt" in text, text
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["sha256"] == file_sha256(library)
    assert op_call(env) == ([], "cpu")  # the rebuilt library is trusted by the next process


@pytest.mark.slow
def test_another_library_under_its_name_is_rebuilt(cache):
    library = cached_library(cache)
    shutil.copyfile(Path(torch.__file__).parent / "lib" / "libc10.so", library)
    env = _environment(TORCH_EXTENSIONS_DIR=str(cache))
    warnings, backend = op_call(env)
    assert backend == "cpu"
    assert len(warnings) == 1 and f"{library} is damaged (hash mismatch); rebuilding it" in warnings[0], warnings
    warnings, text = doctor(env)
    assert not warnings and "cpu yes compiled once, cached" in text and "cpu build log: " in text, text


@pytest.mark.slow
def test_a_damaged_library_without_a_compiler_falls_back_with_one_warning(cache, tmp_path):
    library = cached_library(cache)
    os.truncate(library, library.stat().st_size // 3)
    no_compiler = tmp_path / "bin"
    no_compiler.mkdir()
    env = _environment(TORCH_EXTENSIONS_DIR=str(cache), PATH=str(no_compiler))
    warnings, backend = op_call(env)
    assert backend == "pytorch"
    assert len(warnings) == 1, warnings
    assert f"{library} is damaged (hash mismatch) and cannot be rebuilt: no C++ compiler" in warnings[0]
    assert "using the slower 'pytorch' reference" in warnings[0]
    warnings, text = doctor(env)
    assert not warnings and "cpu no the cached library" in text and "damaged (hash mismatch)" in text, text


@pytest.mark.slow
def test_a_library_without_a_record_is_tried_in_a_child_process(cache, tmp_path):
    """Caches built before records were kept: a good library is adopted, a truncated one only kills the child."""
    library = cached_library(cache)
    record = library.with_suffix(".json")
    record.unlink()
    env = _environment(TORCH_EXTENSIONS_DIR=str(cache))
    assert op_call(env) == ([], "cpu")
    assert json.loads(record.read_text())["sha256"] == file_sha256(library)

    record.unlink()
    os.truncate(library, library.stat().st_size // 3)
    no_compiler = tmp_path / "bin"
    no_compiler.mkdir()
    warnings, backend = op_call({**env, "PATH": str(no_compiler)})
    assert backend == "pytorch"
    assert len(warnings) == 1 and f"{library} is damaged (it fails to load) and cannot be rebuilt" in warnings[0]


def test_a_read_only_cache_falls_back_with_one_warning_that_names_it(tmp_path):
    home_cache = tmp_path / "cache"
    home_cache.mkdir()
    env = _environment(XDG_CACHE_HOME=str(home_cache))
    with read_only(home_cache):
        warnings, backend = op_call(env)
        _, text = doctor(env)
    assert backend == "pytorch"
    assert len(warnings) == 1, warnings
    folder = home_cache / "sparse_detr" / "torch_extensions"
    assert f"the kernel cache {folder} cannot be written" in warnings[0]
    assert "set TORCH_EXTENSIONS_DIR to a writable folder" in warnings[0]
    assert "using the slower 'pytorch' reference" in warnings[0]
    assert f"cpu no the kernel cache {folder} cannot be written" in text, text


@pytest.mark.slow
def test_a_read_only_cache_still_loads_its_verified_library(cache):
    with read_only(cache):
        assert op_call(_environment(TORCH_EXTENSIONS_DIR=str(cache))) == ([], "cpu")


# -- ablations ----------------------------------------------------------------------------------------------


def test_empty_seed_list_is_refused(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('preset = "tiny"\nseeds = []\n')
    result = runner.invoke(app, ["ablate", str(path), "--report-only"])
    one_line(result, 2, "sweep.toml", "seeds = [] lists no seed")


def test_unknown_criterion_names_the_known_ones():
    result = runner.invoke(app, ["ablate", "--criterion", "dam,saliency"])
    one_line(result, 2, "unknown ranking 'saliency'", "dam, oam, foreground, salience, random")


def test_another_sweep_never_writes_over_a_report(tmp_path, monkeypatch, library_lines):
    """The shipped reports/default has no record of its sweep: a changed sweep gets a numbered folder, a
    chosen folder is refused unless --force, and the same sweep finds its folder again."""
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / "reports" / "default"
    shipped.mkdir(parents=True)
    (shipped / "ablation.md").write_text("the shipped report")
    changed = resolve_sweep(None, rankings=("dam",), keep_ratios=(0.1, 0.2, 0.3))
    placed = claim_report_folder(changed)
    assert placed.name == "default-2" and placed.report_dir.as_posix() == "reports/default-2"
    assert placed.run_root.as_posix().endswith("runs/ablate/default-2")
    assert "reports/default holds another sweep's report" in library_lines()[0]
    assert sorted(path.name for path in shipped.iterdir()) == ["ablation.md"]
    assert claim_report_folder(changed).name == "default-2"  # the same sweep, the same folder
    other = resolve_sweep(None, rankings=("oam",))
    assert claim_report_folder(other).name == "default-3"
    with pytest.raises(SweepError, match=r"reports/default holds the report of another sweep .* --force"):
        claim_report_folder(changed, chosen=True)
    assert claim_report_folder(changed, chosen=True, force=True).report_dir.resolve() == shipped
    # a record of the same sweep lets it write there; one that differs names the difference
    default = default_sweep()
    (shipped / SWEEP_FILE).write_text(tomli_w.dumps(sweep_to_dict(default)))
    assert claim_report_folder(default).name == "default"
    with pytest.raises(SweepError, match=r"keep_ratios \(stored \[0\.1\], now \[0\.1, 0\.2, 0\.3\]\)"):
        claim_report_folder(changed, chosen=True)


def test_ctrl_c_in_a_sweep_says_where_it_stopped(tmp_path, monkeypatch):
    splits = synthetic_splits(make_synthetic_dataset(tmp_path / "synth", num_train=2, num_val=1, image_size=64))
    paths = dict(zip(("train_images", "train_ann", "val_images", "val_ann"), (str(p) for p in splits)))
    path = tmp_path / "mini.toml"
    path.write_text(
        'preset = "tiny"\nrankings = ["dam"]\nkeep_ratios = [0.3]\nseeds = [0, 1]\n'
        + "".join(f'{key} = "{value}"\n' for key, value in paths.items())
        + f'output = "{tmp_path / "report"}"\nruns_dir = "{tmp_path / "runs"}"\n[train]\nepochs = 1\n'
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    result = runner.invoke(app, ["ablate", str(path)])
    one_line(result, 130, "ablation mini stopped during run 1/4 (baseline (seed 0))", "run the same command again")
