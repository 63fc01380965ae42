"""Bad input and faults, as a hostile but realistic user meets them: every case is one line that names the
file or option (exit code 2 for usage, 1 for failures), no silently wrong AP, and no run that cannot be
recovered."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import urllib.error

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sparse_detr.checkpoint import load_model, read_checkpoint, save_checkpoint
from sparse_detr.cli import app
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.data import CocoDetection, make_synthetic_dataset, synthetic_splits
from sparse_detr.data.annotations import AnnotationFileError
from sparse_detr.engine import TrainConfig, build_datasets, train
from sparse_detr.engine import trainer as trainer_module
from sparse_detr.engine.initialization import InitialWeights
from sparse_detr.errors import CheckpointError, DeviceError, NonFiniteError, SparseDetrError
from sparse_detr.models import build_model
from sparse_detr.utils.device import resolve_device

runner = CliRunner()
IMAGE_SIZE = 96
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


def one_line(result, code: int, *fragments: str) -> str:
    """The error line of a CLI ``result`` that exited with ``code``, checked to hold ``fragments``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return errors[0]


def copy_dataset(synth, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(synth, target)
    return target


def edit_annotations(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


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


# -- checkpoints ----------------------------------------------------------------------------------------------


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
    arguments = ["eval", "--checkpoint", str(run_folder), "--data", str(data), "--workers", "0", "--output-dir",
                 str(tmp_path / "eval")]
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


# -- options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, code, fragments",
    [
        (["train", "--preset", "sparse"], 2, ["unknown preset 'sparse'"]),
        (["train", "--rho", "nan"], 2, ["keep_ratio must be in [0, 1], got nan"]),
        (["eval", "--checkpoint", "RUN", "--rho", "nan"], 2, ["keep_ratio (--rho) must be in [0, 1], got nan"]),
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


# -- divergence -------------------------------------------------------------------------------------------


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
    real_build = trainer_module.build_optimizer

    def poisoned_optimizer(model, config, world_size):
        optimizer, steps = real_build(model, config, world_size), []

        def poison(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == 3:  # the first step of epoch 2
                with torch.no_grad():
                    next(model.parameters()).fill_(math.nan)

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(trainer_module, "build_optimizer", poisoned_optimizer)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"the weights after the optimizer step became NaN or infinite at step 3"):
        train(get_preset("tiny"), _tiny_config(out), *datasets)
    good = read_checkpoint(out / "checkpoint.pth")
    assert (good["epoch"], good["step"]) == (1, 2)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())

    monkeypatch.setattr(trainer_module, "build_optimizer", real_build)
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
