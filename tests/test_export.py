"""ONNX export: one file with dynamic batch, height and width in each --msda form (standard operators, the
custom node onnxruntime runs with the project's kernel, TensorRT's plugin node), onnxruntime and OpenVINO
equal to PyTorch, `sdetr predict|eval --onnx` equal to the PyTorch predictions and AP, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CATEGORIES, one_line, tiny_model
from typer.testing import CliRunner

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.cli import app
from sparse_detr.config import get_preset
from sparse_detr.data.synthetic import render_scene
from sparse_detr.export import OnnxDetector, compare_with_pytorch, export_onnx
from sparse_detr.models import build_model

onnx = pytest.importorskip("onnx")
TensorProto = onnx.TensorProto
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
    from sparse_detr.zoo import load_model

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
    assert result.exit_code == 1 and "is not an ONNX file" in result.output


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
    from sparse_detr.zoo import load_model

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


def _export(checkpoint, out, *options):
    result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def exported_custom(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny_custom.onnx"
    output = _export(tiny_checkpoint, out, "--msda", "custom")
    assert "deformable attention as custom" in " ".join(output.split()) and "largest absolute difference" in output
    return out


def _attention_layers(checkpoint) -> int:
    from sparse_detr.models.deformable_attention import MSDeformAttn
    from sparse_detr.zoo import load_model

    return sum(isinstance(module, MSDeformAttn) for module in load_model(checkpoint).modules())


def test_the_custom_form_is_one_node_per_attention_layer(exported_custom, tiny_checkpoint):
    from sparse_detr.ops.onnx import CUSTOM_DOMAIN, CUSTOM_OP

    model = onnx.load(str(exported_custom))
    onnx.checker.check_model(model, full_check=True)
    custom = [node for node in model.graph.node if node.domain == CUSTOM_DOMAIN]
    assert {node.op_type for node in custom} == {CUSTOM_OP} and len(custom) == _attention_layers(tiny_checkpoint)
    assert "GridSample" not in {node.op_type for node in model.graph.node}
    assert json.loads({p.key: p.value for p in model.metadata_props}["sparse_detr"])["msda"] == "custom"


def test_the_custom_form_under_onnxruntime_equals_pytorch(exported_custom, tiny_checkpoint):
    from sparse_detr.zoo import load_model

    detector = OnnxDetector(exported_custom)
    assert detector.msda == "custom"
    differences = compare_with_pytorch(detector, load_model(tiny_checkpoint), SIZES)
    assert differences["pred_logits"] < 1e-4 and differences["pred_boxes"] < 1e-4, differences


def test_the_onnxruntime_library_equals_the_torch_op_in_both_layouts(tmp_path):
    """Both nodes of the library against the torch op's reference, sampling points outside the maps included;
    a malformed input is one error line naming the node."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sparse_detr.ops.onnx import CUSTOM_DOMAIN, CUSTOM_OP, TENSORRT_DOMAIN, TENSORRT_OP
    from sparse_detr.ops.onnxruntime_library import library_path
    from sparse_detr.ops.reference import ms_deform_attn_pytorch

    shapes = torch.tensor([[12, 16], [6, 8], [3, 4], [1, 2]])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    tokens, generator = int((shapes[:, 0] * shapes[:, 1]).sum()), torch.Generator().manual_seed(0)
    value = torch.randn(2, tokens, 8, 32, generator=generator)
    locations = torch.rand(2, 50, 8, 4, 4, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(2, 50, 8, 4, 4, generator=generator)
    expected = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    for domain, name, level_type in ((CUSTOM_DOMAIN, CUSTOM_OP, TensorProto.INT64),
                                     (TENSORRT_DOMAIN, TENSORRT_OP, TensorProto.INT32)):  # fmt: skip
        names = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
        types = [TensorProto.FLOAT, level_type, level_type, TensorProto.FLOAT, TensorProto.FLOAT]
        graph = helper.make_graph(
            [helper.make_node(name, names, ["output"], domain=domain)], "msda",
            [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library_path()))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        levels = np.int64 if level_type == TensorProto.INT64 else np.int32
        feeds = {"value": value.numpy(), "spatial_shapes": shapes.numpy().astype(levels),
                 "level_start_index": starts.numpy().astype(levels), "sampling_locations": locations.numpy(),
                 "attention_weights": weights.numpy()}  # fmt: skip
        (output,) = session.run(None, feeds)
        assert output.shape == ((2, 50, 8, 32) if domain == TENSORRT_DOMAIN else (2, 50, 256))
        torch.testing.assert_close(torch.from_numpy(output).reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(
            Exception, match=rf"{name}: level 3 of shape \(1, 2\) starting at 252 does not fit in value's S = 253"
        ):
            session.run(None, {**feeds, "value": value[:, 1:].numpy()})


@pytest.mark.slow
def test_the_tensorrt_form_is_the_plugins_documented_node(tiny_checkpoint, tmp_path):
    """TensorRT's MultiscaleDeformableAttnPlugin_TRT (plugin/multiscaleDeformableAttnPlugin/README.md): five
    inputs value (N, S, M, D), spatial_shapes (L, 2) and level_start_index (L,) in int32, sampling_locations
    (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); no fields; output (N, Lq, M, D). The file runs
    under onnxruntime with the custom-op library (as the export checked) and equals PyTorch."""
    from sparse_detr.ops.onnx import TENSORRT_OP
    from sparse_detr.zoo import load_model

    out = tmp_path / "tiny_trt.onnx"
    assert "deformable attention as tensorrt" in " ".join(_export(tiny_checkpoint, out, "--msda", "tensorrt").split())
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    onnx.checker.check_model(model, full_check=True)
    nodes = [node for node in model.graph.node if node.op_type == TENSORRT_OP]
    assert len(nodes) == _attention_layers(tiny_checkpoint)
    assert "GridSample" not in {node.op_type for node in model.graph.node}
    known = {value.name: value.type.tensor_type for value in [*model.graph.value_info, *model.graph.input]}
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in nodes:
        assert len(node.input) == 5 and len(node.output) == 1
        assert {a.name: a.s for a in node.attribute} == {"plugin_version": b"1", "plugin_namespace": b""}
        ranks = [len(known[name].shape.dim) for name in node.input]
        assert ranks == [4, 2, 1, 6, 5]
        float32, int32 = TensorProto.FLOAT, TensorProto.INT32
        assert [known[name].elem_type for name in node.input] == [float32, int32, int32, float32, float32]
        assert all(producers[name].op_type == "Cast" for name in node.input[1:3])
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["sparse_detr"])
    assert metadata["msda"] == "tensorrt"
    detector = OnnxDetector(out, allow_tensorrt=True)
    differences = compare_with_pytorch(detector, load_model(tiny_checkpoint), SIZES)
    assert differences["pred_logits"] < 1e-4 and differences["pred_boxes"] < 1e-4, differences
    image = tmp_path / "scene.png"
    render_scene(96, np.random.default_rng(0))[0].save(image)
    one_line(runner.invoke(app, ["predict", str(image), "--onnx", str(out)]), 1, "TensorRT's plugin node",
             f"trtexec --onnx={out}")  # fmt: skip


def test_openvino_runs_the_gridsample_file_as_pytorch(exported, tiny_checkpoint):
    pytest.importorskip("openvino")
    from sparse_detr.zoo import load_model

    differences = compare_with_pytorch(OnnxDetector(exported, runtime="openvino"), load_model(tiny_checkpoint), SIZES)
    assert differences["pred_logits"] < 1e-4 and differences["pred_boxes"] < 1e-4, differences


@pytest.mark.slow
def test_eval_onnx_gives_the_checkpoints_ap(tmp_path):
    """`sdetr eval --onnx` (onnxruntime, custom and gridsample files, and OpenVINO) against `sdetr eval
    --checkpoint` on the same split: the same detections, so the same AP."""
    from sparse_detr.data import make_synthetic_dataset, synthetic_splits

    root = make_synthetic_dataset(tmp_path / "synth", num_train=1, num_val=3, image_size=96)
    _, _, val_images, val_ann = synthetic_splits(root)
    names = {c["id"]: c["name"] for c in json.loads(val_ann.read_text())["categories"]}
    model = _realistic(tiny_model({"model.num_classes": max(names) + 1, "model.num_queries": 20}))
    categories = {label: {"id": label, "name": name} for label, name in names.items()}
    checkpoint = save_checkpoint(tmp_path / "model.pth", model, categories=categories, train_config={"image_size": 96})
    data = ["--val-images", str(val_images), "--val-ann", str(val_ann), "--workers", "0"]

    def evaluate(label, *source):
        result = runner.invoke(app, ["eval", *source, *data, "--output-dir", str(tmp_path / label)])
        assert result.exit_code == 0, result.output
        stored = json.loads(next((tmp_path / label).glob("eval_*.json")).read_text())
        detections = json.loads(next((tmp_path / label).glob("detections_*.json")).read_text())
        return stored, sorted(detections, key=lambda d: (d["image_id"], -d["score"]))

    expected, expected_detections = evaluate("pytorch", "--checkpoint", str(checkpoint), "--device", "cpu")
    assert expected_detections
    gridsample, custom = (_exported_file(checkpoint, tmp_path, msda) for msda in ("gridsample", "custom"))
    sources = {"onnxruntime": ["--onnx", str(gridsample)], "custom": ["--onnx", str(custom)]}
    if importlib.util.find_spec("openvino") is not None:
        sources["openvino"] = ["--onnx", str(gridsample), "--runtime", "openvino"]
    for label, source in sources.items():
        stored, detections = evaluate(label, *source)
        assert stored["runtime"] == ("openvino" if label == "openvino" else "onnxruntime")
        assert stored["AP"] == pytest.approx(expected["AP"], abs=0.001), label  # 0.1 AP points
        scores, expected_scores = ([d["score"] for d in found] for found in (detections, expected_detections))
        assert scores == pytest.approx(expected_scores, abs=1e-4), label


def _exported_file(checkpoint, folder, msda):
    out = folder / f"{msda}.onnx"
    _export(checkpoint, out, "--msda", msda, "--no-check")
    return out


def test_runtime_mistakes_get_one_line(exported, exported_custom, tiny_checkpoint, tmp_path, monkeypatch):
    image = tmp_path / "scene.png"
    render_scene(96, np.random.default_rng(0))[0].save(image)
    predict = ["predict", str(image), "--out", str(tmp_path / "d.json")]
    one_line(runner.invoke(app, [*predict, "--onnx", str(exported_custom), "--runtime", "openvino"]), 1,
             "OpenVINO does not know", "--msda gridsample")  # fmt: skip
    one_line(runner.invoke(app, [*predict, "--checkpoint", str(tiny_checkpoint), "--runtime", "openvino"]), 2,
             "add --onnx FILE")  # fmt: skip
    one_line(runner.invoke(app, [*predict, "--onnx", str(exported), "--runtime", "tvm"]), 2, "--runtime 'tvm'")
    export = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x.onnx")]
    one_line(runner.invoke(app, [*export, "--msda", "plugin"]), 2, "--msda 'plugin'", "gridsample, custom, tensorrt")
    benchmark = ["benchmark", "--onnx", str(exported), "--input-size", "96x128", "--output", str(tmp_path / "bench")]
    one_line(runner.invoke(app, [*benchmark, "--preset", "tiny"]), 2, "--onnx times the exported file", "--preset")
    one_line(runner.invoke(app, [*benchmark, "--batch-sizes", "0"]), 2, "--batch-sizes needs positive integers")
    one_line(runner.invoke(app, ["benchmark", "--runtime", "openvino"]), 2, "add --onnx FILE")
    newer = onnx.load(str(exported))
    next(entry for entry in newer.opset_import if entry.domain == "").version = 20
    onnx.save(newer, str(tmp_path / "opset20.onnx"))
    one_line(runner.invoke(app, [*predict, "--onnx", str(tmp_path / "opset20.onnx"), "--runtime", "openvino"]), 1,
             "opset 20", "--opset 19 or lower")  # fmt: skip
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    one_line(runner.invoke(app, [*predict, "--onnx", str(exported), "--runtime", "openvino"]), 1,
             "pip install 'sparse-detr[openvino]'")  # fmt: skip


@pytest.mark.slow
def test_without_a_compiler_custom_falls_back_to_gridsample(tiny_checkpoint, exported_custom, tmp_path, monkeypatch):
    from sparse_detr.ops import onnxruntime_library

    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnxruntime_library, "_built", {})
    image = tmp_path / "scene.png"
    render_scene(96, np.random.default_rng(0))[0].save(image)
    one_line(runner.invoke(app, ["predict", str(image), "--onnx", str(exported_custom)]), 1,
             "needs the onnxruntime custom-op library", "no C++ compiler", "--msda gridsample")  # fmt: skip
    out = tmp_path / "fallback.onnx"
    output = " ".join(_export(tiny_checkpoint, out, "--msda", "custom", "--no-check").split())
    assert "no C++ compiler" in output and "wrote --msda gridsample instead" in output
    assert "deformable attention as gridsample" in output and OnnxDetector(out).msda == "gridsample"


def test_benchmark_times_exported_files_under_each_runtime(exported, exported_custom, tmp_path):
    import pandas as pd

    runtimes = "onnxruntime,openvino" if importlib.util.find_spec("openvino") is not None else "onnxruntime"
    for path, runtime in ((exported, runtimes), (exported_custom, "onnxruntime")):
        folder = tmp_path / path.stem
        result = runner.invoke(app, ["benchmark", "--onnx", str(path), "--runtime", runtime, "--input-size", "96x128",
                                     "--batch-sizes", "1,2", "--iters", "2", "--output", str(folder)])  # fmt: skip
        assert result.exit_code == 0, result.output
        table = pd.read_csv(folder / "benchmark_onnx.csv")
        assert list(table["runtime"]) == [name for name in runtime.split(",") for _ in (1, 2)]
        assert list(table["batch"]) == [1, 2] * len(runtime.split(","))
        assert set(table["msda"]) == {"custom" if path == exported_custom else "gridsample"}
        assert (table["seconds"] > 0).all() and (table["fps"] - table["batch"] / table["seconds"]).abs().max() < 1e-9
        assert (
            "AVX" in (folder / "benchmark_onnx.md").read_text()
            or "no AVX2" in (folder / "benchmark_onnx.md").read_text()
        )
