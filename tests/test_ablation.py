"""sdetr ablate: sweep files, run names and shards, and a 2-run mini ablation that is re-run, interrupted
and reported again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sparse_detr import engine
from sparse_detr.ablation import runner as ablation
from sparse_detr.ablation.report import COLUMNS, INFERENCE_COLUMNS
from sparse_detr.ablation.sweep import (
    DEFAULT_SWEEP_FILE,
    Sweep,
    SweepError,
    default_sweep,
    load_sweep,
    parse_shard,
    resolve_sweep,
    shard_runs,
)
from sparse_detr.cli import app
from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.engine import trainer

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_runs_are_expanded_with_readable_names():
    sweep = Sweep(rankings=("dam", "oam"), keep_ratios=(0.1, 0.3), random=True, no_enc_aux=True,
                  eval_keep_ratios=(0.2, 0.5), eval_train_keep_ratio=0.5)  # fmt: skip
    runs = sweep.runs()
    assert [run.name for run in runs] == [
        "baseline", "dam-rho0.1", "dam-rho0.3", "oam-rho0.1", "oam-rho0.3", "dam-rho0.1-noaux", "dam-rho0.3-noaux",
        "oam-rho0.1-noaux", "oam-rho0.3-noaux", "random-rho0.1", "random-rho0.3", "dam-rho0.5",
    ]  # fmt: skip
    assert runs[-1].eval_keep_ratios == (0.2, 0.5) and all(not run.eval_keep_ratios for run in runs[:-1])
    assert runs[0].model_overrides() == {"model.keep_ratio": 0.0, "model.use_enc_aux_loss": False}
    assert runs[5].model_overrides() == {
        "model.keep_ratio": 0.1, "model.use_enc_aux_loss": False, "model.token_ranking": "dam"
    }  # fmt: skip
    # the inference-time model is an existing run when one matches: it is not trained twice
    same = Sweep(keep_ratios=(0.1, 0.3), eval_keep_ratios=(0.5,)).runs()
    expected = [("baseline", ()), ("dam-rho0.1", (0.5,)), ("dam-rho0.3", ())]
    assert [(run.name, run.eval_keep_ratios) for run in same] == expected


def test_sweep_file_round_trip(tmp_path):
    path = tmp_path / "my_sweep.toml"
    path.write_text(
        'preset = "sparse-rho0.2"\nbackbone = "swin-t"\nrankings = ["oam"]\nkeep_ratios = [0.2, 0.4]\n'
        "baseline = false\n"
        'data = "coco"\neval_keep_ratios = [0.1]\neval_train_keep_ratio = 0.2\n[train]\nepochs = 3\n'
        '[model]\npretrained_backbone = "timm"\n[benchmark]\nimages = 2\ncoverage_images = 10\n'
    )
    sweep = load_sweep(path)
    assert sweep.name == "my_sweep"  # the file's stem
    assert (sweep.preset, sweep.backbone, sweep.rankings, sweep.keep_ratios) == (
        "sparse-rho0.2",
        "swin-t",
        ("oam",),
        (0.2, 0.4),
    )
    assert sweep.train == {"epochs": 3} and sweep.model == {"pretrained_backbone": "timm"}
    assert (sweep.benchmark.images, sweep.benchmark.coverage_images) == (2, 10)
    assert sweep.report_dir == Path("reports/my_sweep") and sweep.run_root == Path("runs/ablate/my_sweep")
    assert [run.name for run in sweep.runs()] == ["oam-rho0.2", "oam-rho0.4"]
    assert sweep.runs()[0].eval_keep_ratios == (0.1,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rhoo = [0.1]", "unknown key 'rhoo'"),
        ("[train]\nepoch = 3", "unknown key [train] 'epoch'"),
        ("[train]\noutput_dir = 'x'", "[train] output_dir is set by each run"),
        ("[model]\nkeep_ratio = 0.2", "[model] keep_ratio is set by each run"),
        ("[benchmark]\nimage = 2", "unknown key [benchmark] 'image'"),
        ("keep_ratios = 0.1", "keep_ratios must be a list of numbers"),
        ("keep_ratios = [1.5]", "keep_ratios values must be in (0, 1]"),
        ("rankings = ['dam', 'xyz']", "unknown ranking 'xyz'"),
        ("preset = 'big'", "unknown preset 'big'"),
        ("baseline = 'yes'", "baseline must be true or false"),
        ("keep_ratios = []\nbaseline = false", "the sweep has no runs"),
        ("data = 'coco'\nval_ann = 'a.json'", "give either data"),
        ("keep_ratios = [0.1", "is not valid TOML"),
        ("[train]\nepochs = 0", "[train]: epochs must be at least 1"),
        ("[model]\nbackbone_norm = 'group'", "[model]: backbone_norm must be one of"),
    ],
)
def test_sweep_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value).split("TOML:")[0]


def test_shipped_experiments_load_and_the_default_is_built_in():
    names = {path.stem: load_sweep(path) for path in [*EXPERIMENTS.glob("*.toml"), DEFAULT_SWEEP_FILE]}
    assert {"default", "rho_sweep", "oam_vs_dam", "enc_aux_loss", "inference_rho"} <= set(names)
    assert names["default"] == default_sweep() == resolve_sweep()
    assert names["default"].data_source.is_builtin and names["default"].preset == "tiny"
    for name in ("rho_sweep", "oam_vs_dam", "enc_aux_loss", "inference_rho"):
        assert names[name].data is not None and names[name].backbone is None and names[name].preset != "tiny"
    assert "oam-rho0.3" in [run.name for run in names["oam_vs_dam"].runs()]
    assert "dam-rho0.5-noaux" in [run.name for run in names["enc_aux_loss"].runs()]
    assert names["inference_rho"].runs()[0].eval_keep_ratios == (0.1, 0.2, 0.3, 0.4, 0.5, 1.0)


def test_options_override_the_file():
    sweep = resolve_sweep(EXPERIMENTS / "rho_sweep.toml",keep_ratios=(0.2,), epochs=3, workers=0, data="/data/coco2017",
                          random=True, name="quick")  # fmt: skip
    assert sweep.keep_ratios == (0.2,) and sweep.random and sweep.name == "quick"
    assert sweep.train["epochs"] == 3 and sweep.train["workers"] == 0 and sweep.train["grad_accum"] == 8
    assert sweep.data == "/data/coco2017" and sweep.report_dir == Path("reports/quick")
    # no file: another preset trains with its own recipe, not the default ablation's shortened one
    other = resolve_sweep(preset="sparse-rho0.3", rankings=("oam",))
    assert other.train == {} and other.rankings == ("oam",) and other.name == "sparse-rho0.3"
    with pytest.raises(SweepError, match="unknown ranking"):
        resolve_sweep(rankings=("objectness",))


def test_shards_split_the_runs_disjointly():
    runs = Sweep(rankings=("dam", "oam"),keep_ratios=(0.1, 0.2, 0.3)).runs()
    shards = [shard_runs(runs, *parse_shard(f"{index}/3")) for index in range(3)]
    names = [run.name for shard in shards for run in shard]
    assert sorted(names) == sorted(run.name for run in runs) and len(set(names)) == len(runs)
    assert [len(shard) for shard in shards] == [3, 2, 2]
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SweepError, match="I/N"):
            parse_shard(bad)


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepoch = 3\n")
    result = runner.invoke(app, ["ablate", str(path)])
    assert result.exit_code == 2
    assert "unknown key [train] 'epoch'" in result.output
    result = runner.invoke(app, ["ablate", "--rho", "0.1,x"])
    assert result.exit_code != 0 and "comma-separated numbers" in result.output


# the mini ablation: baseline + dam at rho 0.3 (also evaluated at rho 0.2), 2 batches each


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(sweep file, sweep, CLI output) of a finished 2-run ablation on 4 generated images."""
    root = tmp_path_factory.mktemp("ablation")
    splits = synthetic_splits(make_synthetic_dataset(root / "synth", num_train=4, num_val=2, image_size=96))
    paths = dict(zip(("train_images", "train_ann", "val_images", "val_ann"), (str(p) for p in splits)))
    path = root / "mini.toml"
    path.write_text(
        'preset = "tiny"\nrankings = ["dam"]\nkeep_ratios = [0.3]\nbaseline = true\neval_keep_ratios = [0.2, 0.3]\n'
        + "".join(f'{key} = "{value}"\n' for key, value in paths.items())
        + f'output = "{root / "report"}"\nruns_dir = "{root / "runs"}"\ndevice = "cpu"\n'
        "[train]\nepochs = 1\niters_per_epoch = 2\nbatch_size = 1\nworkers = 0\nimage_size = 96\n"
        "[benchmark]\nimages = 1\nwarmup = 0\niters = 1\n"
    )
    result = runner.invoke(app, ["ablate", str(path)])
    assert result.exit_code == 0, result.output
    return path, load_sweep(path), result.output


def _forbid(*names):
    def fail(*args, **kwargs):
        raise AssertionError(f"{names} must not run")

    return fail


@pytest.mark.slow
def test_mini_ablation_writes_the_tables_and_plots(mini):
    _, sweep, output = mini
    assert "[1/2] baseline" in output and "[2/2] dam-rho0.3" in output and "ablation mini" in output
    report = sweep.report_dir
    for name in ("ablation.csv", "ablation.md", "ap_vs_rho.png", "ap_vs_gflops.png", "inference_rho.csv",
                 "inference_rho.md", "inference_rho.png"):  # fmt: skip
        assert (report / name).stat().st_size > 0, name
    table = pd.read_csv(report / "ablation.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["run"]) == ["baseline", "dam-rho0.3"]
    assert list(table["rho"]) == [1.0, 0.3] and list(table["enc_aux_loss"]) == [False, True]
    assert (table["gflops"] > 0).all() and (table["fps"] > 0).all()
    assert math.isnan(table["dam_coverage"][0]) and 0 < table["dam_coverage"][1] <= 100
    # the baseline encodes every token: it costs more than the sparse model
    assert table["gflops"][0] > table["gflops"][1]
    inference = pd.read_csv(report / "inference_rho.csv")
    assert list(inference.columns) == INFERENCE_COLUMNS
    assert list(inference["eval_rho"]) == [0.2, 0.3] and set(inference["train_rho"]) == {0.3}
    assert inference["gflops"][0] < inference["gflops"][1]
    assert inference["AP"][1] == pytest.approx(table["AP"][1])  # ρ 0.3 is the training's own evaluation
    result = json.loads((sweep.run_root / "dam-rho0.3" / "result.json").read_text())
    final = json.loads((sweep.run_root / "dam-rho0.3" / "metrics_final.json").read_text())
    assert result["metrics"]["AP"] == final["AP"] and result["settings"]["train"]["epochs"] == 1
    assert "| ranking" in (report / "ablation.md").read_text()


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_report_only_rebuilds(mini, monkeypatch):
    path, sweep, _ = mini
    monkeypatch.setattr(engine, "train", _forbid("training"))
    monkeypatch.setattr(engine, "evaluate_checkpoint", _forbid("evaluation"))
    monkeypatch.setattr(ablation, "measure_model", _forbid("measurement"))
    result = runner.invoke(app, ["ablate", str(path)])
    assert result.exit_code == 0, result.output
    assert "baseline: finished, skipped" in result.output and "dam-rho0.3: finished, skipped" in result.output

    for file in sweep.report_dir.iterdir():
        file.unlink()
    result = runner.invoke(app, ["ablate", str(path), "--report-only"])
    assert result.exit_code == 0, result.output
    assert {"ablation.csv", "ablation.md", "ap_vs_rho.png", "ap_vs_gflops.png", "inference_rho.png"} <= {
        file.name for file in sweep.report_dir.iterdir()
    }
    # a shard runs only its runs; other settings than the stored ones are refused
    logs = []
    ablation.run_ablation(sweep, (1, 2), logs.append)
    assert [line for line in logs if line.startswith("[")] == ["[1/1] dam-rho0.3: finished, skipped"]
    result = runner.invoke(app, ["ablate", str(path), "--epochs", "2"])
    assert result.exit_code == 2 and "train.epochs (stored 1, now 2)" in result.output


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(mini, monkeypatch):
    _, sweep, _ = mini
    result_file = sweep.run_root / "dam-rho0.3" / "result.json"
    stored = json.loads(result_file.read_text())
    result_file.unlink()  # as if killed after training, before its result was written
    # its checkpoint is finished: the run resumes with no training step, and the baseline is skipped
    monkeypatch.setattr(trainer, "train_one_epoch", _forbid("a training epoch"))
    logs = []
    report = ablation.run_ablation(sweep, log=logs.append)
    assert "[1/2] baseline: finished, skipped" in logs and "[2/2] dam-rho0.3" in logs
    assert "  training in " + str(sweep.run_root / "dam-rho0.3") + " (resuming from its checkpoint)" in logs
    resumed = json.loads(result_file.read_text())
    assert resumed["metrics"] == stored["metrics"] and resumed["settings"] == stored["settings"]
    assert [e["keep_ratio"] for e in resumed["evaluations"]] == [0.2, 0.3]
    assert list(report.table["run"]) == ["baseline", "dam-rho0.3"]
