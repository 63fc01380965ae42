"""The sdetr command line end to end: synthetic data, a short training run, evaluation."""

from __future__ import annotations

import json

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
    result = runner.invoke(app, ["train", *splits, "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2",
                                 "--image-size", "128", "--workers", "0", "--output-dir", str(run)])  # fmt: skip
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
