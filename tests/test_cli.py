"""The sdetr command line end to end: synthetic data, a short training run, evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparse_detr.cli import app

runner = CliRunner()


def test_help_lists_the_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "benchmark", "ablate", "visualize", "doctor", "data"):
        assert command in result.output


@pytest.mark.slow
def test_synth_train_eval(tmp_path):
    data = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", "--out", str(data), "--num-train", "6", "--num-val", "3",
                                 "--image-size", "128"])  # fmt: skip
    assert result.exit_code == 0, result.output
    splits = ["--train-images", str(data / "train"), "--train-ann", str(data / "annotations/instances_train.json"),
              "--val-images", str(data / "val"), "--val-ann", str(data / "annotations/instances_val.json")]  # fmt: skip
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "tiny", *splits, "--epochs", "1", "--iters-per-epoch", "2",
                                 "--batch-size", "2", "--image-size", "128", "--workers", "0",
                                 "--output-dir", str(run)])  # fmt: skip
    assert result.exit_code == 0, result.output
    final = json.loads((run / "metrics_final.json").read_text())
    assert {"AP", "AP50", "AR100"} <= set(final)
    result = runner.invoke(app, ["eval", "--checkpoint", str(run / "checkpoint.pth"), "--val-images",
                                 str(data / "val"), "--val-ann", str(data / "annotations/instances_val.json"),
                                 "--rho", "0.5", "--workers", "0", "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(AP)" in result.output and list((tmp_path / "eval").glob("*.json"))


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "nowhere.pth")])
    assert result.exit_code != 0
    assert "checkpoint not found" in result.output


def test_zoo_lists_the_released_checkpoints():
    result = runner.invoke(app, ["zoo"])
    assert result.exit_code == 0, result.output
    for name in ("sparse-detr-r50-rho0.1", "sparse-detr-swint-rho0.5", "sparse-detr-r50-scrl-rho0.3"):
        assert name in result.output
    assert "45.3" in result.output and "SDETR_ZOO_DIR" in result.output


def test_print_config_resolves_the_layers_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.toml").write_text("[model]\nnum_queries = 100\n[train]\nlr = 1e-4\nepochs = 12\n")
    result = runner.invoke(app, ["train", "--preset", "sparse-rho0.2", "--config", "mine.toml", "--set",
                                 "train.lr=5e-5", "--set", "model.backbone=swin-t", "--epochs", "6",
                                 "--data", "coco", "--print-config"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    for line in ('preset = "sparse-rho0.2"', 'backbone = "swin-t"', "num_queries = 100", "lr = 5e-05",
                 "epochs = 6", 'root = "coco"', 'pretrained_backbone = "imagenet"'):  # fmt: skip
        assert line in text, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "arguments, message, code",
    [
        (["--data", "coco"], "a dataset needs a model preset: pass --preset (one of deformable,", 2),
        (["--set", "model.keep_rato=0.1"], "--set unknown config key 'model.keep_rato'; known:", 2),
        (["--set", "train.epochs=two"], "--set train.epochs must be an integer, got 'two'", 2),
        (["--init", "a.pth", "--resume", "b.pth", "--preset", "tiny"], "init starts a new run", 2),
        (["--preset", "sparse-rho0.1", "--pretrained-backbone", "none"], "backbone_norm=batch_norm", 2),
        (["--config", "missing.toml"], "config file not found: missing.toml", 2),
        (["--init", "no-such-model"], "checkpoint not found: no-such-model (not a file, a run folder or a zoo", 1),
    ],
)
def test_bad_training_options_are_one_line(tmp_path, monkeypatch, arguments, message, code):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *arguments])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_imagenet_weights_stop_before_any_work(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = runner.invoke(app, ["train", "--preset", "sparse-rho0.1", "--data", str(tmp_path / "coco")])
    assert result.exit_code == 1, result.output  # a failure, not a usage error
    text = " ".join(result.output.split())
    assert "resnet50-0676ba61.pth" in text and "--pretrained-backbone" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_fine_tune_a_run_on_other_classes_and_read_its_config_back(tmp_path, monkeypatch):
    """Train on the built-in classes, fine-tune on a dataset that shares two of them: their class rows
    carry over, the new run records its start, and its config.toml gives the same run back."""
    monkeypatch.chdir(tmp_path)
    shapes = tmp_path / "shapes"
    other = tmp_path / "other"
    for folder, extra in ((shapes, []), (other, ["--classes", "triangle,hexagon,star", "--seed", "1"])):
        result = runner.invoke(app, ["data", "synth", "--out", str(folder), "--num-train", "4", "--num-val", "2",
                                     "--image-size", "96", *extra])  # fmt: skip
        assert result.exit_code == 0, result.output
    quick = ["--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2", "--image-size", "96", "--workers", "0"]
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(shapes), *quick, "--output-dir", "a"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["train", "--init", "a", "--data", str(other), *quick, "--output-dir", "b"])
    assert result.exit_code == 0, result.output
    assert "rows carried over by name: triangle, star" in " ".join(result.output.split())
    started = json.loads((tmp_path / "b" / "initial_weights.json").read_text())
    # a run folder starts the new run from its best checkpoint
    assert started["init"]["file"] == str(Path("a") / "checkpoint_best.pth") and len(started["init"]["sha256"]) == 64

    result = runner.invoke(app, ["train", "--config", "b/config.toml", "--print-config"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "config.toml").read_text().strip() == result.output.strip()

    result = runner.invoke(app, ["eval", "--checkpoint", "b", "--workers", "0", "--output-dir", "eval"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval" / "eval_checkpoint_best.json").read_text())
    assert evaluated["image_size"] == 96  # from the run's config
    assert evaluated["AP"] == json.loads((tmp_path / "b" / "metrics_final.json").read_text())["AP"]  # as it measured


@pytest.fixture
def library_logger(monkeypatch):
    """The ``sparse_detr`` logger, its level restored after the test (``-q`` / ``-v`` set it)."""
    logger = logging.getLogger("sparse_detr")
    monkeypatch.setattr(logger, "level", logger.level)
    return logger


def test_quiet_hides_status_lines_and_keeps_results(tmp_path, library_logger):
    synth = ["data", "synth", "--num-train", "2", "--num-val", "1", "--image-size", "48", "--out"]
    loud = runner.invoke(app, [*synth, str(tmp_path / "loud")])
    assert loud.exit_code == 0 and "writing the synthetic dataset (2 + 1 images)" in loud.stderr
    for flag in ("--quiet", "-q"):
        out = tmp_path / flag.strip("-")
        quiet = runner.invoke(app, [flag, *synth, str(out)])
        assert quiet.exit_code == 0 and quiet.stderr == ""
        assert f"wrote the synthetic dataset to {out}" in "".join(quiet.stdout.splitlines())  # the result stays
    assert library_logger.level == logging.WARNING


def test_verbose_shows_the_library_debug_lines(library_logger, monkeypatch):
    from sparse_detr.ops import loader

    monkeypatch.setattr(loader, "_loaded", {})  # load again, as a new process would
    monkeypatch.setattr(loader, "_cannot_run", lambda kind: "no compiler in this test")
    result = runner.invoke(app, ["-v", "doctor"])
    assert "debug: sparse_detr.ops.loader: the 'cpu' kernel is unavailable: no compiler in this test" in result.stderr
    plain = runner.invoke(app, ["doctor"])
    assert "debug:" not in plain.output
