"""ONNX export: one file with dynamic batch, height and width, standard operators only, onnxruntime equal to
PyTorch, `sdetr predict --onnx` equal to the PyTorch predictions, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CATEGORIES, tiny_model
from typer.testing import CliRunner

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.cli import app
from sparse_detr.config import get_preset
from sparse_detr.data.synthetic import render_scene
from sparse_detr.export import OnnxDetector, compare_with_pytorch, export_onnx
from sparse_detr.models import build_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

runner = CliRunner()
# three image sizes, other than the export's example; batches of one and of two padded differently
SIZES = ([(96, 128)], [(160, 120), (128, 176)], [(200, 150)], [(72, 300), (96, 96)])
# what `sdetr export` stores beside a graph (OnnxDetector refuses a file without it)
METADATA = {"categories": {"1": {"id": 11, "name": "disc"}}, "image_size": 64}


def _realistic(model):
    """A random model whose padded tokens score like a trained model's: low. Their scoring input is zeroed,
    so they tie exactly; a random ``enc_output`` bias can rank that tie into the top-k, and which tied
    tokens a top-k keeps is the implementation's choice (a trained model learns to score them low)."""
    torch.nn.init.zeros_(model.transformer.enc_output.bias)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = _realistic(tiny_model({"model.num_classes": 4, "model.num_queries": 20, "model.keep_ratio": 0.3}))
    path = tmp_path_factory.mktemp("model") / "checkpoint.pth"
    return save_checkpoint(path, model, categories=TINY_CATEGORIES, train_config={"image_size": 64})


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with `sdetr export` (onnxruntime checked against PyTorch there too)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnx.checker passed" in result.output and "largest absolute difference" in result.output
    return out


def test_the_file_is_standard_onnx_with_dynamic_batch_and_size(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom op: any runtime runs it
    assert "GridSample" in {node.op_type for node in model.graph.node}
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) == 18
    inputs = {value.name: value.type.tensor_type.shape.dim for value in model.graph.input}
    assert list(inputs) == ["images", "mask"]
    for name, dynamic in (("images", (0, 2, 3)), ("mask", (0, 1, 2))):
        assert all(inputs[name][axis].dim_param and not inputs[name][axis].dim_value for axis in dynamic), name
    assert [value.name for value in model.graph.output] == ["pred_logits", "pred_boxes"]
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["sparse_detr"])
    assert metadata["keep_ratio"] == 0.3 and metadata["image_size"] == 64
    assert metadata["categories"]["2"] == {"id": 12, "name": "square"}


def test_onnxruntime_equals_pytorch_at_every_size_and_batch(exported, tiny_checkpoint):
    from sparse_detr.checkpoint import load_model

    differences = compare_with_pytorch(OnnxDetector(exported), load_model(tiny_checkpoint), SIZES)
    assert differences["pred_logits"] < 1e-4 and differences["pred_boxes"] < 1e-4, differences


def test_predict_onnx_writes_the_pytorch_results(exported, tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index, size in enumerate((96, 128)):
        render_scene(size, np.random.default_rng(index))[0].save(images / f"scene{index}.png")
    results = {}
    for name, source in (("pytorch", ["--checkpoint", str(tiny_checkpoint)]), ("onnx", ["--onnx", str(exported)])):
        out = tmp_path / f"{name}.json"
        command = ["predict", str(images), *source, "--out", str(out), "--threshold", "0"]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
        results[name] = json.loads(out.read_text())
    assert len(results["onnx"]) == len(results["pytorch"]) > 0
    key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
    for got, expected in zip(sorted(results["onnx"], key=key), sorted(results["pytorch"], key=key)):
        assert (got["image_id"], got["category_id"], got["category_name"], got["file_name"]) == (
            expected["image_id"], expected["category_id"], expected["category_name"], expected["file_name"]
        )  # fmt: skip
        assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
        assert got["bbox"] == pytest.approx(expected["bbox"], abs=1e-3)


def test_export_errors_are_one_line(exported, tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(exported)])
    assert result.exit_code == 2 and "--force" in result.output
    out = str(tmp_path / "x.onnx")
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--out", out, "--opset", "15"])
    assert result.exit_code == 2 and "opset 16" in result.output and "Traceback" not in result.output
    image = tmp_path / "scene.png"
    render_scene(96, np.random.default_rng(0))[0].save(image)
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(exported), "--rho", "0.5"])
    assert result.exit_code == 2 and "fixed at export" in result.output
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and "missing.onnx" in result.output and "sdetr export" in result.output
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(image)])
    assert result.exit_code == 1 and "onnxruntime cannot load it" in result.output


def test_missing_onnx_packages_say_how_to_install(monkeypatch, exported):
    import importlib

    real = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    result = runner.invoke(app, ["export", "--checkpoint", "x.pth", "--out", str(exported.parent / "y.onnx")])
    assert result.exit_code == 1 and "pip install 'sparse-detr[onnx]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_postprocessing_graph_equals_postprocess(tiny_checkpoint, tmp_path):
    from sparse_detr.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    path = export_onnx(model, tmp_path / "post.onnx", postprocess=True, metadata=METADATA)
    detector = OnnxDetector(path)
    assert detector.takes_original_sizes
    differences = compare_with_pytorch(detector, model, SIZES)
    assert differences["labels"] == 0 and differences["scores"] < 1e-5 and differences["boxes"] < 1e-2, differences


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deformable-topk-bbr", "sparse-rho0.1"])
def test_r50_presets_export_from_one_file(preset, tmp_path, one_thread):
    torch.manual_seed(0)
    model = _realistic(build_model(get_preset(preset)))
    path = export_onnx(model, tmp_path / f"{preset}.onnx", metadata=METADATA)
    r50_sizes = ([(256, 320)], [(320, 256), (288, 352)], [(400, 300)])
    differences = compare_with_pytorch(OnnxDetector(path), model, r50_sizes)
    assert differences["pred_logits"] < 1e-4 and differences["pred_boxes"] < 1e-4, differences
