"""sdetr ablate: sweep files, run names and shards, and a 2-run mini ablation that is re-run, interrupted
and reported again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import lock_held_elsewhere
from typer.testing import CliRunner

from sparse_detr import engine
from sparse_detr.ablation import runner as ablation
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
from sparse_detr.ablation.tables import COLUMNS, COMPARISON_COLUMNS, INFERENCE_COLUMNS, RUN_COLUMNS
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
        ("keep_ratios = [1.5]", "keep_ratios: each value must be a number in (0, 1]"),
        ("rankings = ['dam', 'xyz']", "unknown ranking 'xyz'"),
        ("preset = 'big'", "unknown preset 'big'"),
        ("baseline = 'yes'", "baseline must be true or false"),
        ("keep_ratios = []\nbaseline = false", "the sweep has no runs"),
        ("data = 'coco'\nval_ann = 'a.json'", "give either data"),
        ("keep_ratios = [0.1", "is not valid TOML"),
        ("[train]\nepochs = 0", "[train] epochs must be at least 1"),
        ("[model]\nbackbone_norm = 'group'", "[model] backbone_norm must be one of"),
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
    assert {"default", "rho_sweep", "oam_vs_dam", "enc_aux_loss", "inference_rho", "selection_rules"} <= set(names)
    assert names["default"] == default_sweep() == resolve_sweep()
    assert names["default"].data_source.is_builtin and names["default"].preset == "tiny-ablation"
    assert len(names["default"].run_seeds) >= 2
    for name in ("rho_sweep", "oam_vs_dam", "enc_aux_loss", "inference_rho", "selection_rules"):
        assert names[name].data is not None and names[name].backbone is None and names[name].preset != "tiny"
        assert len(names[name].seeds) >= 2
    assert "oam-rho0.3" in [run.name for run in names["oam_vs_dam"].runs()]
    assert "dam-rho0.5-noaux" in [run.name for run in names["enc_aux_loss"].runs()]
    assert names["inference_rho"].runs()[0].eval_keep_ratios == (0.1, 0.2, 0.3, 0.4, 0.5, 1.0)
    rules = {run.name for run in names["selection_rules"].runs() if run.seed == 42}
    assert rules == {"baseline", *(f"{ranking}-rho{rho}" for rho in (0.1, 0.3)
                                   for ranking in ("dam", "oam", "foreground", "salience", "random"))}  # fmt: skip


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
    runs = Sweep(rankings=("dam", "oam"), keep_ratios=(0.1, 0.2, 0.3)).runs()
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


# the mini ablation: baseline + dam at rho 0.3 (also evaluated at rho 0.2), 2 seeds, 2 batches each

T_975_DF1 = 12.706204736  # Student t, 97.5 % quantile, 1 degree of freedom (two seeds)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(sweep file, sweep, CLI output) of a finished 2-variant, 2-seed ablation on 4 generated images."""
    root = tmp_path_factory.mktemp("ablation")
    splits = synthetic_splits(make_synthetic_dataset(root / "synth", num_train=4, num_val=2, image_size=96))
    paths = dict(zip(("train_images", "train_ann", "val_images", "val_ann"), (str(p) for p in splits)))
    path = root / "mini.toml"
    path.write_text(
        'preset = "tiny"\nrankings = ["dam"]\nkeep_ratios = [0.3]\nbaseline = true\neval_keep_ratios = [0.2, 0.3]\n'
        "seeds = [3, 4]\n"
        + "".join(f'{key} = "{value}"\n' for key, value in paths.items())
        + f'output = "{root / "report"}"\nruns_dir = "{root / "runs"}"\ndevice = "cpu"\n'
        "[train]\nepochs = 1\niters_per_epoch = 2\nbatch_size = 1\nworkers = 0\nimage_size = 96\nlr = 0.01\n"
        "[benchmark]\nimages = 1\nwarmup = 0\niters = 3\n"
    )
    result = runner.invoke(app, ["ablate", str(path)])
    assert result.exit_code == 0, result.output
    return path, load_sweep(path), result.output


def _forbid(*names):
    def fail(*args, **kwargs):
        raise AssertionError(f"{names} must not run")

    return fail


def _interval(values):
    """Mean and 95 % t interval of two values, by hand."""
    mean = sum(values) / 2
    sd = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
    half = T_975_DF1 * sd / math.sqrt(2)
    return mean, sd, mean - half, mean + half


@pytest.mark.slow
def test_mini_ablation_writes_intervals_over_seeds(mini):
    _, sweep, output = mini
    assert "plan: 4 runs = 2 variants x 2 seeds" in output
    assert "[1/4] baseline (seed 3)" in output and "[4/4] dam-rho0.3 (seed 4)" in output
    report = sweep.report_dir
    tables = [
        f"{stem}.{kind}" for stem in ("ablation", "comparisons", "runs", "inference_rho") for kind in ("csv", "md")
    ]
    for name in (*tables, "ap_vs_rho.png", "ap_vs_gflops.png", "inference_rho.png"):
        assert (report / name).stat().st_size > 0, name
    runs = pd.read_csv(report / "runs.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert list(zip(runs["run"], runs["seed"])) == [("baseline", 3), ("baseline", 4), ("dam-rho0.3", 3),
                                                    ("dam-rho0.3", 4)]  # fmt: skip
    # each run's numbers are its result.json's, and the two seeds trained two different models
    results = {(r, seed): json.loads((sweep.run_root / r / f"seed{seed}" / "result.json").read_text())
               for r in ("baseline", "dam-rho0.3") for seed in (3, 4)}  # fmt: skip
    assert results["dam-rho0.3", 3]["settings"]["train"]["seed"] == 3
    assert results["dam-rho0.3", 3]["dam_coverage"] != results["dam-rho0.3", 4]["dam_coverage"]
    table = pd.read_csv(report / "ablation.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["run"]) == ["baseline", "dam-rho0.3"] and list(table["seeds"]) == [2, 2]
    for row, variant in enumerate(("baseline", "dam-rho0.3")):
        for metric in ("AP", "AP50"):
            values = [100 * results[variant, seed]["metrics"][metric] for seed in (3, 4)]
            expected = _interval(values)
            got = [table[f"{metric}{suffix}"][row] for suffix in ("", "_sd", "_ci_low", "_ci_high")]
            assert got == pytest.approx(expected, abs=1e-9)
    coverage = _interval([100 * results["dam-rho0.3", seed]["dam_coverage"] for seed in (3, 4)])
    assert [table[f"dam_coverage{suffix}"][1] for suffix in ("", "_sd", "_ci_low", "_ci_high")] == pytest.approx(
        coverage
    )
    # GFLOPs by part add up, and sparsity saves in the encoder only
    parts = table[["gflops_backbone", "gflops_encoder", "gflops_rest"]].sum(axis=1)
    assert list(parts) == pytest.approx(list(table["gflops"]))
    assert table["gflops_backbone"][0] == pytest.approx(table["gflops_backbone"][1])
    assert table["gflops_encoder"][0] > table["gflops_encoder"][1]
    assert ((table["fps_q1"] <= table["fps"]) & (table["fps"] <= table["fps_q3"])).all()
    # the paired difference is the interval of the per-seed differences
    comparisons = pd.read_csv(report / "comparisons.csv")
    assert list(comparisons.columns) == COMPARISON_COLUMNS
    ap = comparisons[comparisons["metric"] == "AP"].iloc[0]
    assert ap["comparison"] == "dam-rho0.3 − baseline" and ap["seeds"] == 2
    differences = [100 * (results["dam-rho0.3", s]["metrics"]["AP"] - results["baseline", s]["metrics"]["AP"])
                   for s in (3, 4)]  # fmt: skip
    mean, sd, low, high = _interval(differences)
    assert [ap["difference"], ap["sd"], ap["ci_low"], ap["ci_high"]] == pytest.approx([mean, sd, low, high])
    assert ap["excludes_zero"] == (low > 0 or high < 0)
    assert "dam_coverage" not in set(comparisons["metric"])  # the baseline has no coverage to compare
    inference = pd.read_csv(report / "inference_rho.csv")
    assert list(inference.columns) == INFERENCE_COLUMNS
    assert list(inference["eval_rho"]) == [0.2, 0.3] and list(inference["seeds"]) == [2, 2]
    assert inference["AP"][1] == pytest.approx(table["AP"][1])  # ρ 0.3 is the trainings' own evaluation
    text = (report / "ablation.md").read_text()
    assert " ± " in text and "seeds: 3, 4" in text and "median of 3 timed passes" in text


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_report_only_rebuilds(mini, monkeypatch, library_lines):
    path, sweep, _ = mini
    monkeypatch.setattr(engine, "train", _forbid("training"))
    monkeypatch.setattr(engine, "evaluate_checkpoint", _forbid("evaluation"))
    monkeypatch.setattr(ablation, "measure_model", _forbid("measurement"))
    result = runner.invoke(app, ["ablate", str(path)])
    assert result.exit_code == 0, result.output
    assert "baseline (seed 3): finished, skipped" in result.output
    assert "dam-rho0.3 (seed 4): finished, skipped" in result.output

    for file in sweep.report_dir.iterdir():
        file.unlink()
    result = runner.invoke(app, ["ablate", str(path), "--report-only"])
    assert result.exit_code == 0, result.output
    assert {"ablation.csv", "comparisons.md", "runs.csv", "ap_vs_rho.png", "inference_rho.png"} <= {
        file.name for file in sweep.report_dir.iterdir()
    }
    # a shard runs only its runs; other settings than the stored ones are refused
    done_before = len(library_lines())
    ablation.run_ablation(sweep, (1, 2))
    assert [line for line in library_lines()[done_before:] if line.startswith("[")] == [
        "[1/2] dam-rho0.3 (seed 3): finished, skipped", "[2/2] dam-rho0.3 (seed 4): finished, skipped"
    ]  # fmt: skip
    result = runner.invoke(app, ["ablate", str(path), "--epochs", "2"])
    assert result.exit_code == 2 and "train.epochs (stored 1, now 2)" in result.output


@pytest.mark.slow
def test_interrupted_seed_resumes_from_its_checkpoint(mini, monkeypatch, library_lines):
    _, sweep, _ = mini
    result_file = sweep.run_root / "dam-rho0.3" / "seed4" / "result.json"
    stored = json.loads(result_file.read_text())
    result_file.unlink()  # as if killed after training, before its result was written
    # its checkpoint is finished: that seed resumes with no training step, the other runs are skipped
    monkeypatch.setattr(trainer, "train_one_epoch", _forbid("a training epoch"))
    report = ablation.run_ablation(sweep)
    logs = library_lines()
    skipped = [line for line in logs if line.endswith("finished, skipped")]
    assert len(skipped) == 3 and "[4/4] dam-rho0.3 (seed 4)" in logs
    assert "  training in " + str(sweep.run_root / "dam-rho0.3" / "seed4") + " (resuming from its checkpoint)" in logs
    resumed = json.loads(result_file.read_text())
    assert resumed["metrics"] == stored["metrics"] and resumed["settings"] == stored["settings"]
    assert [e["keep_ratio"] for e in resumed["evaluations"]] == [0.2, 0.3]
    assert list(report.table["run"]) == ["baseline", "dam-rho0.3"] and list(report.table["seeds"]) == [2, 2]


@pytest.mark.slow
def test_a_run_another_process_holds_is_skipped(mini, monkeypatch, library_lines):
    _, sweep, _ = mini
    run_dir = sweep.run_root / "baseline" / "seed3"
    result_file = run_dir / "result.json"
    stored = result_file.read_bytes()
    result_file.unlink()
    try:
        with lock_held_elsewhere(run_dir) as holder:
            monkeypatch.setattr(engine, "train", _forbid("training"))
            ablation.run_ablation(sweep)
            logs = library_lines()
            assert any(
                line.startswith("[1/4] baseline (seed 3): skipped, ") and f"in use by another run: process {holder.pid}"
                in line for line in logs
            ), logs  # fmt: skip
            assert not result_file.exists() and sum(line.endswith("finished, skipped") for line in logs) == 3
    finally:
        result_file.write_bytes(stored)


@pytest.mark.slow
def test_status_says_where_every_run_stands(mini, monkeypatch):
    """`sdetr ablate --status` starts nothing: done runs with their AP, a run another process holds as running
    (naming it), one with a checkpoint and no result as interrupted."""
    from sparse_detr.ablation.status import sweep_status

    path, sweep, _ = mini
    monkeypatch.setattr(engine, "train", _forbid("training"))
    table = sweep_status(sweep)
    assert list(table["state"]) == ["done"] * 4 and table["AP"].notna().all()
    assert list(table["epoch"]) == [1] * 4

    held, interrupted = sweep.run_root / "baseline" / "seed3", sweep.run_root / "dam-rho0.3" / "seed4"
    stored = {folder: (folder / "result.json").read_bytes() for folder in (held, interrupted)}
    for folder in stored:
        (folder / "result.json").unlink()
    report_files = sorted(sweep.report_dir.iterdir())
    try:
        with lock_held_elsewhere(held) as holder:
            rows = {(row.run, row.seed): row for row in sweep_status(sweep).itertuples()}
            assert rows["baseline", 3].state == "running" and f"process {holder.pid}" in rows["baseline", 3].detail
            assert rows["dam-rho0.3", 4].state == "interrupted" and rows["dam-rho0.3", 3].state == "done"
            result = runner.invoke(app, ["ablate", str(path), "--status"], env={"COLUMNS": "200"})
            assert result.exit_code == 0, result.output
            assert "2 of 4 runs done" in result.output and "running" in result.output
            assert "interrupted" in result.output
    finally:
        for folder, data in stored.items():
            (folder / "result.json").write_bytes(data)
    assert sorted(sweep.report_dir.iterdir()) == report_files  # --status wrote nothing
