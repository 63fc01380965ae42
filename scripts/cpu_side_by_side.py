"""CPU inference latency of this project against the reference implementation, measured in one run.

Times the reference's only CPU path (its grid_sample op) with ``../shared/reference/k_cpu_latency.py``, this
project's models with ``sdetr benchmark`` in every PyTorch inference mode, and the same models exported with
``sdetr export`` (``--msda gridsample`` and ``custom``) under onnxruntime and OpenVINO with ``sdetr benchmark
--onnx``, each in a fresh process, on random-weight R50 models; prints a Markdown table (seconds per image,
batch 1; speed-up over the reference) with the CPU's model and extensions, and how each exported file compares
with the fast PyTorch path, for docs/PERFORMANCE.md.

usage: python scripts/cpu_side_by_side.py [--size 800x1066] [--iters 3] [--threads 2] [--no-compile]
                                          [--no-exported] [--reference PATH/k_cpu_latency.py]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from sparse_detr.utils.cpu import cpu_description

ROOT = Path(__file__).resolve().parents[1]
# this project's preset -> the reference's configuration of the same model
MODELS = {"sparse-rho0.1": "sparse_detr_rho_0.1", "deformable-topk-bbr": "efficient_detr"}
# column -> sdetr benchmark options
MODES = {
    "eager": ["--plain"],
    "fast fp32": [],
    "fast bf16": ["--amp", "bf16"],
    "compiled fp32": ["--compile"],
    "compiled bf16": ["--compile", "--amp", "bf16"],
}
# column -> (sdetr export --msda, sdetr benchmark --runtime)
EXPORTED = {
    "onnxruntime gridsample": ("gridsample", "onnxruntime"),
    "onnxruntime custom": ("custom", "onnxruntime"),
    "openvino gridsample": ("gridsample", "openvino"),
}


def reference_seconds(script: Path, config: str, size: str, iters: int, threads: int) -> float:
    """The median seconds the reference's script reports (``k_latency CONFIG median min max``)."""
    output = subprocess.run(
        [sys.executable, str(script), config, size, str(iters), str(threads)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    line = next(line for line in output.splitlines() if line.startswith("k_latency"))
    return float(line.split()[2])


def project_seconds(preset: str, options: list[str], size: str, iters: int, threads: int) -> float:
    """The median seconds per image of ``sdetr benchmark`` (batch 1, a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "sparse_detr.cli", "benchmark", "--preset", preset, "--input-size", size,
             "--no-flops", "--batch-sizes", "1", "--iters", str(iters), "--threads", str(threads),
             "--device", "cpu", "--output", folder, *options],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        row = pd.read_csv(Path(folder) / "benchmark.csv").iloc[0]
    return 1.0 / float(row["fps_bs1"])


def exported_seconds(path: Path, runtime: str, size: str, iters: int, threads: int) -> float:
    """The median seconds per image of ``sdetr benchmark --onnx`` (batch 1, a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "sparse_detr.cli", "benchmark", "--onnx", str(path), "--runtime", runtime,
             "--input-size", size, "--batch-sizes", "1", "--iters", str(iters), "--threads", str(threads),
             "--output", folder],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return float(pd.read_csv(Path(folder) / "benchmark_onnx.csv").iloc[0]["seconds"])


def export_preset(preset: str, msda: str, folder: Path, image_size: int) -> Path:
    """A random-weight model of ``preset`` exported with ``msda`` into ``folder``."""
    import torch

    from sparse_detr.checkpoint import Category
    from sparse_detr.config import get_preset
    from sparse_detr.export import export_onnx, file_metadata
    from sparse_detr.models import build_model

    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    classes = {label: Category(label, f"class {label}") for label in range(model.config.model.num_classes)}
    path = folder / f"{preset}-{msda}.onnx"
    return export_onnx(model, path, metadata=file_metadata(model, classes, image_size), msda=msda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="800x1066")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="Leave out the torch.compile modes (slow to build).")
    parser.add_argument("--no-exported", action="store_true", help="Leave out the exported files (a minute each).")
    parser.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference" / "k_cpu_latency.py")
    args = parser.parse_args()
    if not args.reference.is_file():
        sys.exit(f"the reference's timing script is not at {args.reference}: pass --reference PATH")
    modes = {name: options for name, options in MODES.items() if not (args.no_compile and "--compile" in options)}
    exported = {} if args.no_exported else EXPORTED
    rows, against_fast = [], []
    for preset, config in MODELS.items():
        reference = reference_seconds(args.reference, config, args.size, args.iters, args.threads)
        row = {"model": preset, "reference": f"{reference:.2f} s"}
        seconds = {}
        for mode, options in modes.items():
            seconds[mode] = project_seconds(preset, options, args.size, args.iters, args.threads)
        with tempfile.TemporaryDirectory() as folder:
            files = {msda: export_preset(preset, msda, Path(folder), min(int(side) for side in args.size.split("x")))
                     for msda in sorted({msda for msda, _ in exported.values()})}  # fmt: skip
            for column, (msda, runtime) in exported.items():
                seconds[column] = exported_seconds(files[msda], runtime, args.size, args.iters, args.threads)
        for column, value in seconds.items():
            row[column] = f"{value:.2f} s ({reference / value:.2f}×)"
            print(f"{preset} {column}: {value:.3f} s, reference {reference:.3f} s", file=sys.stderr, flush=True)
            if column in exported:
                against_fast.append(f"{preset} {column}: {value / seconds['fast fp32']:.2f}× the fast fp32 time")
        rows.append(row)
    print(f"CPU: {cpu_description()}; {args.threads} threads; one random {args.size} image, batch 1, "
          f"median of {args.iters} timed passes; random R50 weights\n")  # fmt: skip
    print(pd.DataFrame(rows).to_markdown(index=False))
    if against_fast:
        print("\n" + "\n".join(against_fast))


if __name__ == "__main__":
    main()
