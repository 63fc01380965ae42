"""Two CPU processes under ``torchrun`` (gloo) train the tiny preset and end with identical weights, and
evaluate a checkpoint to the numbers of a single process.

The test runs this file as the ``torchrun`` worker script: ``torchrun ... test_distributed.py DATA OUT``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.data.source import DataSource
from sparse_detr.engine import evaluate_checkpoint
from sparse_detr.engine.run_config import EvalSettings


def _worker(data_dir: str, out_dir: str) -> None:
    """One rank: train two iterations, save this rank's final weights to ``out/rank{R}.pt``, then evaluate
    the checkpoint in batches of 2 into ``out/distributed_eval``."""
    from sparse_detr.config import get_preset
    from sparse_detr.data import synthetic_splits
    from sparse_detr.engine import TrainConfig, build_datasets, evaluate_checkpoint, train, trainer

    fit = trainer.fit

    def fit_and_dump(run, *args):
        metrics = fit(run, *args)
        torch.save(run.model.state_dict(), Path(out_dir) / f"rank{run.info.rank}.pt")
        return metrics

    trainer.fit = fit_and_dump
    train_set, val_set = build_datasets(*synthetic_splits(data_dir), image_size=96)
    config = TrainConfig(
        epochs=1,
        batch_size=1,
        iters_per_epoch=2,
        workers=0,
        image_size=96,
        output_dir=str(Path(out_dir) / "run"),
        log_every=1,
        device="cpu",
    )
    train(get_preset("tiny"), config, train_set, val_set)
    _, _, val_images, val_ann = synthetic_splits(data_dir)
    checkpoint = Path(out_dir) / "run" / "checkpoint.pth"
    split = DataSource(val_images=str(val_images), val_ann=str(val_ann))
    evaluate_checkpoint(checkpoint, EvalSettings(split, batch_size=2, device="cpu", workers=0),
                        Path(out_dir) / "distributed_eval")  # fmt: skip
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    data = make_synthetic_dataset(tmp_path / "synth", num_train=4, num_val=5, image_size=96)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, __file__, str(data), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    weights = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    checkpoint = torch.load(out / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, weights[0][key]), key
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # rank 0 alone writes
    assert "AP" in json.loads((out / "run" / "metrics_final.json").read_text())

    # 5 images in batches of 2 over 2 processes: blocks of whole batches, so the same images share a batch
    # (and so the same padding) as in one process, and the detections are the same
    _, _, val_images, val_ann = synthetic_splits(data)
    split = DataSource(val_images=str(val_images), val_ann=str(val_ann))
    single = evaluate_checkpoint(out / "run" / "checkpoint.pth", EvalSettings(split, batch_size=2, device="cpu",
                                 workers=0), out / "single_eval")  # fmt: skip
    distributed = json.loads((out / "distributed_eval" / "eval_checkpoint.json").read_text())
    distributed = {key: math.nan if distributed[key] is None else distributed[key] for key in single}  # null: n/a
    assert distributed == pytest.approx(single, nan_ok=True)
    scores = []
    for folder in ("single_eval", "distributed_eval"):
        by_image = defaultdict(list)
        for detection in json.loads((out / folder / "detections_checkpoint.json").read_text()):
            by_image[detection["image_id"]].append(detection["score"])
        scores.append({image: sorted(values) for image, values in by_image.items()})
    assert scores[0].keys() == scores[1].keys() and len(scores[0]) == 5
    for image, values in scores[0].items():
        assert values == pytest.approx(scores[1][image], abs=1e-5), image


if __name__ == "__main__":
    _worker(*sys.argv[1:3])


@pytest.mark.slow
def test_two_nodes_train_to_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    """Two torchrun "nodes" (one process each, c10d rendezvous, as on two machines) with a batch of one image
    each against one process accumulating two batches of one image: the same steps on the same images."""
    common = ["train", "--epochs", "1", "--batch-size", "1", "--image-size", "96", "--workers", "0",
              "--device", "cpu", "--set", "train.log_every=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                "-m",
                "sparse_detr.cli",
                *common,
                "--iters-per-epoch",
                "4",
                "--output-dir",
                str(tmp_path / "two-nodes"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(output[-3000:] for output in outputs)
    single = [sys.executable, "-m", "sparse_detr.cli", *common, "--grad-accum", "2", "--iters-per-epoch", "8"]
    done = subprocess.run([*single, "--output-dir", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    states = [torch.load(tmp_path / name / "checkpoint.pth", weights_only=True) for name in ("two-nodes", "one")]
    assert states[0]["step"] == states[1]["step"] == 4
    statistics = ("running_mean", "running_var", "num_batches_tracked")  # per-process BatchNorm estimates differ
    for key, value in states[0]["model"].items():
        if not key.endswith(statistics):
            assert torch.equal(value, states[1]["model"][key]), key  # one thread each: the same sums in order
