"""The ablation report's statistics on made-up results: intervals over seeds, paired differences, the
comparisons the paper makes, and a one-seed report that says it has no interval."""

from __future__ import annotations

import json
import math

import pytest

from sparse_detr.ablation.report import write_report
from sparse_detr.ablation.stats import mean_interval, paired_difference
from sparse_detr.ablation.sweep import Sweep, SweepError, load_sweep, resolve_sweep, with_changes
from sparse_detr.ablation.tables import ablation_table, comparisons_table, learning_curve, readable, runs_table


def test_mean_interval_is_the_student_t_interval():
    interval = mean_interval([30.0, 32.0, 34.0])
    # mean 32, sd 2, t(0.975, 2) = 4.302653
    assert (interval.mean, interval.sd, interval.n) == (32.0, 2.0, 3)
    assert interval.half_width == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    assert interval.excludes_zero is True
    one = mean_interval([30.0, float("nan")])  # NaN: a metric the split cannot give
    assert one.n == 1 and one.mean == 30.0 and math.isnan(one.low) and one.excludes_zero is None
    assert mean_interval([]).n == 0


def test_paired_difference_uses_the_seeds_both_have():
    a = {0: 30.0, 1: 31.0, 2: 35.0, 3: 20.0}
    b = {0: 29.0, 1: 29.0, 2: 32.0}
    difference = paired_difference(a, b)
    assert difference.n == 3 and difference.mean == pytest.approx(2.0)
    # differences 1, 2, 3: sd 1, half-width t(0.975, 2) / sqrt(3) = 2.48, so the interval holds zero
    assert difference.low == pytest.approx(2.0 - 2.484138, abs=1e-6) and difference.excludes_zero is False
    assert paired_difference({0: 3.0, 1: 4.0, 2: 5.0}, {0: 0.0, 1: 0.0, 2: 0.0}).excludes_zero is True


def _result(run, ranking, keep_ratio, aux, seed, ap, coverage=None):
    return {
        "run": run, "seed": seed, "ranking": ranking, "keep_ratio": keep_ratio, "enc_aux_loss": aux,
        "metrics": {"AP": ap, "AP50": ap + 0.2, "AP75": ap, "APs": ap, "APm": ap, "APl": None},
        "ap_by_epoch": {"1": ap / 2, "2": ap},
        "gflops": 1.0 if ranking == "baseline" else 0.6, "gflops_backbone": 0.4,
        "gflops_encoder": 0.5 if ranking == "baseline" else 0.1, "gflops_rest": 0.1,
        "fps": 10.0 + seed, "fps_q1": 9.0 + seed, "fps_q3": 11.0 + seed, "dam_coverage": coverage,
        "evaluations": [],
        "settings": {"preset": "tiny", "model": {"backbone": "resnet10t"}, "data": {"data": "built-in"},
                     "train": {"epochs": 2, "iters_per_epoch": None, "image_size": 128}},
        "measured_on": {"device": "cpu", "image_sizes": [[128, 128]],
                        "benchmark": {"batch_size": 1, "iters": 40, "warmup": 4}},
    }  # fmt: skip


VARIANTS = [  # name, ranking, keep ratio, aux, AP of seed 0 and 1, coverage
    ("baseline", "baseline", 0.0, False, (0.30, 0.32), None),
    ("dam-rho0.1", "dam", 0.1, True, (0.28, 0.31), 0.5),
    ("oam-rho0.1", "oam", 0.1, True, (0.20, 0.22), 0.3),
    ("dam-rho0.1-noaux", "dam", 0.1, False, (0.25, 0.27), 0.4),
]


def _results(seeds=(0, 1)):
    return [
        _result(name, ranking, rho, aux, seed, aps[seed], coverage)
        for name, ranking, rho, aux, aps, coverage in VARIANTS
        for seed in seeds
    ]


def test_the_paper_comparisons_are_paired_by_seed():
    runs = runs_table(_results())
    table = ablation_table(runs)
    assert list(table["run"]) == ["baseline", "dam-rho0.1", "dam-rho0.1-noaux", "oam-rho0.1"]
    assert table.loc[0, "AP"] == pytest.approx(31.0) and table.loc[0, "seeds"] == 2
    assert table.loc[0, "fps"] == 10.5  # the median over seeds of each run's median
    comparisons = comparisons_table(runs, table)
    ap = comparisons[comparisons["metric"] == "AP"].set_index("comparison")
    assert list(ap["kind"]) == ["against the baseline"] * 3 + ["token ranking", "encoder aux loss"]
    assert ap.loc["oam-rho0.1 − baseline", "difference"] == pytest.approx(-10.0)
    # differences -10 and -10: no spread, an interval of zero width that excludes zero
    assert bool(ap.loc["oam-rho0.1 − baseline", "excludes_zero"]) is True
    assert ap.loc["dam-rho0.1 − oam-rho0.1", "difference"] == pytest.approx(8.5)
    assert ap.loc["dam-rho0.1 − dam-rho0.1-noaux", "difference"] == pytest.approx(3.5)
    # dam − baseline: -2 and -1, t(0.975, 1) * sd / sqrt(2) = 6.35: the interval contains zero
    assert bool(ap.loc["dam-rho0.1 − baseline", "excludes_zero"]) is False
    coverage = comparisons[comparisons["metric"] == "dam_coverage"]
    assert "baseline" not in " ".join(coverage["comparison"])
    assert readable(table).loc[0, "AP"] == "31.00 ± 12.71"
    assert learning_curve(_results()) == {1: pytest.approx(15.5), 2: pytest.approx(31.0)}


def test_one_seed_reports_without_intervals(tmp_path, library_lines):
    for result in _results(seeds=(0,)):
        folder = tmp_path / "runs" / result["run"] / "seed0"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(result))
    report = write_report(tmp_path / "runs", tmp_path / "report")
    logs = library_lines()
    assert (report.table["seeds"] == 1).all() and report.table["AP_ci_low"].isna().all()
    assert report.comparisons["excludes_zero"].isna().all()
    assert "one seed: no intervals" in logs[-1]
    text = (tmp_path / "report" / "ablation.md").read_text()
    assert "With one seed no interval can be given" in text and "±" not in text.split("\n- ")[0]
    assert "no interval" in (tmp_path / "report" / "comparisons.md").read_text()


def test_seeds_name_and_order_the_runs(tmp_path):
    sweep = Sweep(keep_ratios=(0.1,), seeds=(5, 7))
    assert [run.folder for run in sweep.runs()] == [
        "baseline/seed5", "dam-rho0.1/seed5", "baseline/seed7", "dam-rho0.1/seed7"
    ]  # fmt: skip
    assert Sweep(keep_ratios=(0.1,)).run_seeds == (42,)  # the recipe's seed
    assert with_changes(Sweep(keep_ratios=(0.1,)), seed_count=3).seeds == (42, 43, 44)
    assert resolve_sweep(seeds=(1,), seed_count=2).seeds == (1, 2)
    assert len(resolve_sweep(seed_count=1).runs()) == len(resolve_sweep().variants())
    path = tmp_path / "s.toml"
    path.write_text("keep_ratios = [0.1]\nseeds = [0, 1, 2]\n")
    assert load_sweep(path).seeds == (0, 1, 2)
    for text, message in (("seeds = [1, 1]", "distinct"), ("seeds = [0.5]", "list of integers"),
                          ("[train]\nseed = 3", "[train] seed is set by each run")):  # fmt: skip
        path.write_text(text + "\n")
        with pytest.raises(SweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_sweep(path)


def test_the_default_ablation_has_the_papers_compute_profile():
    """Dense encoder at least 40 % of the dense model's GFLOPs, rho 0.1 at least 25 % cheaper in total, at the
    built-in dataset's evaluation size (the paper's R50 at 850x1040: 45 % and 38 %)."""
    import torch

    from sparse_detr.ablation.runner import run_model_config, run_train_config
    from sparse_detr.analysis.flops import count_flops
    from sparse_detr.models import build_model

    sweep = resolve_sweep()
    runs = {run.name: run for run in sweep.variants()}
    size = run_train_config(sweep, runs["baseline"]).image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    counts = {}
    for name in ("baseline", "dam-rho0.1"):
        torch.manual_seed(0)
        counts[name] = count_flops(build_model(run_model_config(sweep, runs[name])), image)
    dense, sparse = counts["baseline"], counts["dam-rho0.1"]
    assert dense.by_stage["encoder"] >= 0.40 * dense.gflops
    assert sparse.gflops <= 0.75 * dense.gflops
    assert sparse.by_stage["backbone"] == pytest.approx(dense.by_stage["backbone"])
