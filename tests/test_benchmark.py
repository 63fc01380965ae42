"""``sdetr benchmark`` on models: the report files, the matrix, the reference figures, bad input."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sparse_detr.analysis.benchmark import model_specs, parameter_counts
from sparse_detr.analysis.fps import measure_fps
from sparse_detr.analysis.latency import ModelSpec, Timing, measure_fps_isolated
from sparse_detr.analysis.reference_figures import REFERENCE_PUBLISHED_PARAMS, reference_preset
from sparse_detr.cli import app
from sparse_detr.config import get_preset
from sparse_detr.models import build_model, prepare_for_inference

runner = CliRunner()
TINY = ["--preset", "tiny", "--input-size", "64x80", "--iters", "2", "--warmup", "0", "--threads", "1"]
ALWAYS = ["preset", "backbone", "rho", "tokens", "kept_tokens", "params", "params_trainable", "params_published"]
FLOP_COLUMNS = ["gflops", "gflops_with_aux", "gflops_as_reference", "gflops_reference", "gflops_reference_with_aux"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_benchmark_writes_the_report_with_the_documented_columns(tmp_path):
    result = runner.invoke(
        app, ["benchmark", *TINY, "--rho", "0.2,0.6", "--batch-sizes", "2,1", "--no-isolate", "--output", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "benchmark.csv")
    for column in [*ALWAYS, *FLOP_COLUMNS, "fps_bs1", "fps_bs2", "peak_memory_mib", "device", "dtype", "fps_iters"]:
        assert column in table, column
    assert table["rho"].tolist() == [0.2, 0.6]
    assert table["kept_tokens"].iloc[0] < table["kept_tokens"].iloc[1]
    assert table["gflops"].iloc[0] < table["gflops"].iloc[1]
    assert table["gflops_reference"].isna().all()  # the reference has no tiny preset
    assert (table["fps_bs1"] > 0).all() and (table["fps_iters"] == 2).all() and table["device"].eq("cpu").all()
    assert "| preset" in (tmp_path / "benchmark.md").read_text()
    parts = pd.read_csv(tmp_path / "gflops_by_part.csv")
    assert "gflops_encoder" in parts
    assert list(parts[["backbone_pct", "encoder_pct", "rest_pct"]].sum(axis=1)) == pytest.approx([100.0] * len(parts))
    for plot in ("gflops_vs_rho.png", "fps_vs_rho.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_no_fps_and_no_flops_skip_their_measurements(tmp_path):
    result = runner.invoke(app, ["benchmark", *TINY, "--no-fps", "--output", str(tmp_path / "flops")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "flops" / "benchmark.csv")
    assert "gflops" in table and not any(column.startswith("fps") for column in table)
    assert (tmp_path / "flops" / "gflops_vs_rho.png").exists() and not (tmp_path / "flops" / "fps_vs_rho.png").exists()

    result = runner.invoke(app, ["benchmark", *TINY, "--no-flops", "--batch-sizes", "1", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "benchmark.csv")
    assert "fps_bs1" in table and "peak_memory_mib" in table and "gflops" not in table
    assert not (tmp_path / "gflops_by_part.csv").exists()


def test_benchmark_over_dataset_images(tmp_path):
    from sparse_detr.data import make_synthetic_dataset, synthetic_splits

    _, _, val_images, val_ann = synthetic_splits(make_synthetic_dataset(tmp_path / "data", 1, 2, 64))
    result = runner.invoke(
        app,
        ["benchmark", *TINY, "--images", "2", "--val-images", str(val_images), "--val-ann", str(val_ann),
         "--image-size", "64", "--no-fps", "--output", str(tmp_path / "report")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the first 2 images" in (tmp_path / "report" / "benchmark.md").read_text()


def test_config_and_set_change_every_model(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[model]\nnum_queries = 30\nenc_layers = 2\n")
    result = runner.invoke(app, ["benchmark", *TINY, "--config", str(config), "--set", "model.enc_layers=1",
                                 "--no-fps", "--output", str(tmp_path / "report")])  # fmt: skip
    assert result.exit_code == 0, result.output
    changed = pd.read_csv(tmp_path / "report" / "benchmark.csv")
    result = runner.invoke(app, ["benchmark", *TINY, "--no-fps", "--output", str(tmp_path / "plain")])
    plain = pd.read_csv(tmp_path / "plain" / "benchmark.csv")
    assert (changed["params"] < plain["params"]).all() and (changed["gflops"] < plain["gflops"]).all()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--preset", "nonexistent"], "unknown preset"),
        (["--preset", "tiny", "--set", "model.enc_layer=1"], "--set unknown config key 'model.enc_layer'"),
        (["--checkpoint", "sparse-detr-r51-rho0.1"], "checkpoint not found: sparse-detr-r51-rho0.1"),
        (["--input-size", "850by1040"], "HEIGHTxWIDTH"),
        (["--checkpoint", "missing.pth"], "checkpoint not found"),
        (["--preset", "tiny", "--rho", "0,0.3"], "--rho must be a number in (0, 1]"),
        (["--amp", "fp8"], "bf16 or fp16"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, arguments, message):
    result = runner.invoke(app, ["benchmark", *arguments, "--output", str(tmp_path)])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "benchmark.csv").exists()


def test_the_matrix_applies_keep_ratios_to_sparse_presets_only():
    specs = model_specs(["deformable", "sparse-rho0.1"], [0.1, 0.3])
    assert [(spec.preset, spec.keep_ratio) for spec in specs] == [
        ("deformable", None),
        ("sparse-rho0.1", 0.1),
        ("sparse-rho0.1", 0.3),
    ]


def test_reference_configurations_are_recognized():
    assert reference_preset(get_preset("sparse-rho0.1").model, 0.3) == "sparse-rho0.3"
    assert reference_preset(get_preset("deformable-topk-bbr", "swin-t").model, 0.0) == "deformable-topk-bbr"
    assert reference_preset(get_preset("sparse-rho0.1").model, 0.25) is None
    assert reference_preset(get_preset("tiny").model, 0.3) is None


@pytest.mark.parametrize("preset, family", [("deformable", "deformable"), ("sparse-rho0.2", "sparse")])
def test_parameter_counts_equal_the_reference(preset, family):
    counts = parameter_counts(build_model(get_preset(preset)))
    assert counts["params_published"] == REFERENCE_PUBLISHED_PARAMS[("r50", family)]
    assert counts["params"] == {"deformable": 40_069_665, "sparse": 41_937_205}[family]


def test_measure_fps_cycles_distinct_images_and_restores_the_mode():
    model = build_model(get_preset("tiny"))
    images = [torch.randn(3, 64, 80), torch.randn(3, 72, 64), torch.randn(3, 64, 64)]
    result = measure_fps(model, images, batch_size=2, warmup=0, iters=3)
    assert model.training
    assert result.iters == 3 and result.batch_size == 2 and result.fps_min <= result.fps <= result.fps_max
    assert result.device == "cpu" and result.dtype == "float32" and result.peak_memory_mib > 0
    with pytest.raises(ValueError, match="amp"):
        prepare_for_inference(model, amp="int8")
    prepared = measure_fps(prepare_for_inference(model, amp="bf16"), images, batch_size=1, warmup=0, iters=1)
    assert prepared.dtype == "bfloat16 autocast"


@pytest.mark.slow
def test_fps_in_a_fresh_process():
    timing = Timing((2, 1), warmup=0, iters=1, threads=1)
    results = measure_fps_isolated(ModelSpec("tiny"), [torch.randn(3, 64, 80)], timing)
    assert [result.batch_size for result in results] == [1, 2]
    assert all(result.fps > 0 and result.peak_memory_mib > 0 for result in results)


def test_training_step_benchmark(tmp_path):
    result = runner.invoke(
        app,
        ["benchmark-train", "--preset", "tiny,tiny", "--input-size", "96x128", "--batch-sizes", "1,2",
         "--iters", "1", "--warmup", "0", "--output", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "train_step.csv")
    assert list(frame["batch_size"]) == [1, 2, 1, 2]
    assert (frame["s_per_iter"] > 0).all() and (frame["height"] == 96).all()
    assert frame["images_per_s"].tolist() == pytest.approx((frame["batch_size"] / frame["s_per_iter"]).tolist())
    assert frame["speedup_vs_first"].iloc[:2].tolist() == [1.0, 1.0]
    assert (tmp_path / "train_step.md").read_text().startswith("# Training step")
