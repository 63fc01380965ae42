"""TensorRT check of `sdetr export --msda tensorrt` on a lent GPU (run by scripts/gpu_check.sh).

Exports random-weight models with TensorRT's MultiscaleDeformableAttnPlugin_TRT node, builds an FP32 and an
FP16 engine from each file as it is (TensorRT's ONNX parser with its standard plugins, no graph surgery), runs
a padded batch of two images, and compares the engines' outputs with the PyTorch model on the same GPU
(queries matched as sets, as `sdetr export` compares onnxruntime). Prints one line per preset and precision;
says in one line what is missing when tensorrt or the onnx extra is not installed.

usage: python scripts/tensorrt_check.py [--presets tiny,sparse-rho0.1] [--size 512x672] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sparse_detr.checkpoint import Category
from sparse_detr.config import get_preset
from sparse_detr.export import _matched, export_onnx, file_metadata
from sparse_detr.models import build_model, pad_images

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BOOL": torch.bool, "INT64": torch.int64,
                "INT32": torch.int32}  # fmt: skip


def build_engine(trt, path: Path, shapes: dict[str, tuple[int, ...]], fp16: bool):
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # registers MultiscaleDeformableAttnPlugin_TRT
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's parser refused {path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, (1, *shape[1:]), shape, shape)
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {path}")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_engine(trt, engine, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    context = engine.create_execution_context()
    outputs = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, feeds[name].data_ptr())
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = TORCH_DTYPES[engine.get_tensor_dtype(name).name]
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
        raise RuntimeError("the TensorRT engine failed to run")
    torch.cuda.synchronize()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,sparse-rho0.1")
    parser.add_argument("--size", default="512x672")
    parser.add_argument("--out", type=Path, default=Path("tensorrt_check"))
    args = parser.parse_args()
    try:
        import tensorrt as trt
    except ImportError:
        sys.exit("tensorrt is not installed here (pip install tensorrt): no TensorRT check")
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to torch: no TensorRT check")
    print(f"TensorRT {trt.__version__}, {torch.cuda.get_device_name()}")
    args.out.mkdir(parents=True, exist_ok=True)
    height, width = (int(side) for side in args.size.split("x"))
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images([torch.randn(3, height, width, generator=generator),
                               torch.randn(3, height - 64, width - 96, generator=generator)])  # fmt: skip
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(get_preset(preset)).eval()
        torch.nn.init.zeros_(model.transformer.enc_output.bias)  # padded tokens rank low, as trained ones do
        classes = {label: Category(label, f"class {label}") for label in range(model.config.model.num_classes)}
        path = export_onnx(model, args.out / f"{preset}-tensorrt.onnx", msda="tensorrt",
                           metadata=file_metadata(model, classes, min(height, width)))  # fmt: skip
        with torch.no_grad():
            expected = model.cuda()(images.cuda(), mask.cuda())
        expected = {name: expected[name].float() for name in ("pred_logits", "pred_boxes")}
        feeds = {"images": images.cuda(), "mask": mask.cuda()}
        for fp16 in (False, True):
            start = time.perf_counter()
            engine = build_engine(trt, path, {name: tuple(value.shape) for name, value in feeds.items()}, fp16)
            built = time.perf_counter() - start
            got = run_engine(trt, engine, feeds)
            got = _matched({name: got[name].float() for name in expected}, expected)
            worst = {name: float((got[name] - value).abs().max()) for name, value in expected.items()}
            print(f"{preset} {'fp16' if fp16 else 'fp32'}: engine built in {built:.0f} s; largest absolute "
                  f"difference from PyTorch: {worst}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
