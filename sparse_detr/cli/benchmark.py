"""``sdetr benchmark`` (models: parameters, GFLOPs, FPS), ``sdetr benchmark-op`` (the deformable attention
op's backends) and ``sdetr benchmark-train`` (seconds per training iteration)."""

from __future__ import annotations

from pathlib import Path

import typer

from sparse_detr.cli._app import CONFIG_OPTION, SET_OPTION, app, command, console, parse_list, parse_size, print_frame
from sparse_detr.errors import UsageError

DEFAULT_PRESETS = "deformable-topk-bbr,sparse-rho0.1"  # the paper's comparison
# short headers of the tables below for narrow terminals: column -> (header, what it means)
SUMMARY_HEADERS = {
    "kept_tokens": ("kept", "encoder tokens kept"),
    "params_published": ("params", "parameters as published (no encoder aux heads)"),
    "gflops_reference": ("ref", "the reference implementation's GFLOPs"),
    "gflops_diff_pct": ("diff %", "gflops against ref"),
    "peak_memory_mib": ("MiB", "peak memory"),
}
OP_HEADERS = {
    "forward_ms": ("fwd", "forward ms"),
    "forward_backward_ms": ("fwd+bwd", "forward and backward ms"),
    "forward_speedup": ("fwd ×", "forward speed-up"),
    "forward_backward_speedup": ("fwd+bwd ×", "forward and backward speed-up"),
}
TRAIN_STEP_HEADERS = {
    "batch_size": ("batch", "batch size"),
    "s_per_iter": ("s/iter", "seconds per iteration"),
    "images_per_s": ("img/s", "images per second"),
    "speedup_vs_first": ("×", "speed-up over the first preset at the same batch size"),
}


@command(app, short_help="Parameters, GFLOPs and FPS of models or exported files.")
def benchmark(
    preset: str | None = typer.Option(
        None, help=f"Comma-separated presets (default {DEFAULT_PRESETS}; with --checkpoint: one)."
    ),
    backbone: str | None = typer.Option(None, help="Backbone for every preset (r50, swin-t, a timm ResNet)."),
    keep_ratios: str | None = typer.Option(
        None, "--rho", help="Comma-separated keep ratios applied to the sparse models."
    ),
    checkpoint: str | None = typer.Option(None, help="Measure this checkpoint: a file, run folder or zoo name."),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    input_size: str = typer.Option("850x1040", help="HEIGHTxWIDTH of the one synthetic image (reference quick mode)."),
    images: int | None = typer.Option(
        None, min=1, help="Use the first N validation images instead (the paper: 100 COCO val2017 images)."
    ),
    root: Path | None = typer.Option(None, "--data", help="With --images: COCO root (its val2017 split)."),
    val_images: Path | None = typer.Option(None, help="With --images: validation images folder."),
    val_ann: Path | None = typer.Option(None, help="With --images: validation instances JSON."),
    image_size: int | None = typer.Option(
        None, min=32, help="With --images: shorter side, as evaluation resizes (default: the config's, else 800)."
    ),
    fps: bool = typer.Option(True, "--fps/--no-fps", help="Time the models."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count GFLOPs with fvcore."),
    batch_sizes: str = typer.Option("1,4", help="Comma-separated batch sizes to time."),
    iters: int | None = typer.Option(
        None, "--iters", "--repeats", min=1, help="Timed passes (default 50 on GPU, 5 on CPU)."
    ),
    warmup: int | None = typer.Option(None, min=0, help="Untimed passes first (default 5 on GPU, 1 on CPU)."),
    amp: str | None = typer.Option(
        None, help="Time under autocast: bf16 (CPUs with AMX or AVX512-BF16, GPUs) or fp16."
    ),
    compile: bool = typer.Option(False, "--compile", help="Time torch.compile(model) (with freezing)."),
    fast: bool = typer.Option(
        True, "--fast/--plain", help="Fold the frozen BatchNorms and use channels_last (--plain: the model as built)."
    ),
    isolate: bool | None = typer.Option(
        None, "--isolate/--no-isolate", help="Time each model in a fresh process (default: on CPU, for peak RSS)."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: torch's)."),
    output: Path | None = typer.Option(None, help="Report folder (default reports/<name>)."),
    name: str = typer.Option("benchmark", help="Report name: reports/<name>."),
    onnx: list[Path] | None = typer.Option(
        None,
        "--onnx",
        help="Time this exported file (repeatable) at --input-size and --batch-sizes, instead of models.",
    ),
    runtime: str | None = typer.Option(
        None, help="With --onnx: comma-separated runtimes (onnxruntime, the default, and openvino)."
    ),
) -> None:
    """Parameters, GFLOPs (fvcore) and FPS of models over presets and keep ratios; --config/--set
    [model]/[loss] fields change every model. With --onnx: seconds per batch of exported files under each
    --runtime (benchmark_onnx.csv/.md).

    Writes benchmark.csv/.md, gflops_by_part.csv/.md, gflops_vs_rho.png and fps_vs_rho.png. GFLOPs follow the
    paper's convention (docs/PERFORMANCE.md) and sit beside the reference implementation's figures where
    they exist (850x1040, 800x1066, 800x1333); FPS is the median over the timed passes.
    """
    sizes = parse_list(batch_sizes, int, "--batch-sizes")
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes needs positive integers, got {batch_sizes!r}")
    if onnx:
        model_options = {"--preset": preset, "--checkpoint": checkpoint, "--rho": keep_ratios, "--amp": amp,
                         "--compile": compile or None, "--images": images}  # fmt: skip
        given = [option for option, value in model_options.items() if value is not None]
        if given:
            raise UsageError(f"--onnx times the exported file as it is: leave out {', '.join(given)}")
        return _benchmark_exported(onnx, parse_list(runtime or "onnxruntime", str, "--runtime"),
                                   parse_size(input_size), sizes, iters or 5, 1 if warmup is None else warmup,
                                   threads, output or Path("reports") / name)  # fmt: skip
    if runtime is not None:
        raise UsageError(f"--runtime {runtime} times an exported file: add --onnx FILE (from `sdetr export`)")
    from sparse_detr.analysis import benchmark as bench
    from sparse_detr.analysis.latency import Timing
    from sparse_detr.engine.run_config import merged_settings, model_overrides, option_settings

    resolved = merged_settings(config_file, settings or (), option_settings(
        {"root": root, "val_images": val_images, "val_ann": val_ann, "image_size": image_size}))  # fmt: skip
    timing = Timing(tuple(sorted(set(sizes))), warmup, iters, amp, compile, device, threads, fast)
    options = bench.BenchmarkOptions(flops, fps, timing, isolate)
    presets = parse_list(preset, str, "--preset") or ([] if checkpoint else parse_list(DEFAULT_PRESETS))
    ratios = parse_list(keep_ratios, float, "--rho")
    models = bench.BenchmarkModels(tuple(presets), tuple(ratios) if ratios else None, backbone, checkpoint,
                                   model_overrides(resolved))  # fmt: skip
    inputs = bench.BenchmarkInputs.from_settings(resolved, parse_size(input_size) if images is None else None, images)
    report = bench.benchmark_models(models, inputs, options, output or Path("reports") / name)
    print_frame(bench.summary(report.result.table), f"benchmark on {report.device}: {report.source}", SUMMARY_HEADERS)
    if amp == "bf16" and str(report.device).startswith("cpu"):
        from sparse_detr.utils.cpu import bf16_note

        console.print(bf16_note(), highlight=False)
    if flops:
        console.print("fvcore skipped (element-wise) ops: " + ", ".join(sorted(report.result.skipped)), highlight=False)
    console.print(f"wrote {', '.join(str(path) for path in report.paths)}", highlight=False)


def _benchmark_exported(paths, runtimes, size, batch_sizes, iters, warmup, threads, folder: Path) -> None:
    from sparse_detr.analysis.exported import time_exported
    from sparse_detr.utils.cpu import cpu_description
    from sparse_detr.utils.io import atomic_write_text

    frame = time_exported(paths, runtimes, size, batch_sizes, iters, warmup, threads)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "benchmark_onnx.csv", frame.to_csv(index=False))
    atomic_write_text(folder / "benchmark_onnx.md", frame.to_markdown(index=False) + f"\n\n{cpu_description()}\n")
    print_frame(frame, f"exported files, {size[0]}x{size[1]}: median seconds of {iters} passes", wrap=["file"])
    console.print(f"{cpu_description()}\nwrote {folder / 'benchmark_onnx.csv'}, {folder / 'benchmark_onnx.md'}",
                  highlight=False)  # fmt: skip


@command(app, "benchmark-op", short_help="Time the deformable attention op's backends.")
def benchmark_op(
    backends: str = typer.Option("pytorch,cpu,cuda", help="Op backends to time."),
    dtype: str = typer.Option("float32", help="float32, float64, float16 or bfloat16."),
    repeats: int = typer.Option(3, "--repeats", "--iters", min=1, help="Timed calls (the median is reported)."),
    output: Path | None = typer.Option(None, help="CSV file for the table."),
) -> None:
    """Forward and forward+backward time of every backend of the deformable attention op at Deformable DETR's
    encoder and decoder shapes (800x1066 input), with the speed-up over the pytorch reference."""
    from sparse_detr.analysis.op_benchmark import DEFAULT_SHAPES, run_op_benchmark

    frame = run_op_benchmark(parse_list(backends, str, "--backends"), repeats=repeats, dtype=dtype)
    title = f"ms_deform_attn, {dtype}: median ms of {repeats} (speed-up vs pytorch)"
    print_frame(frame.drop(columns="dtype"), title, OP_HEADERS)  # the title names the one dtype
    for shape in DEFAULT_SHAPES:
        console.print(f"  {shape.name}: {shape.description}")
    if output is not None:
        from sparse_detr.utils.io import atomic_write_text

        atomic_write_text(output, frame.to_csv(index=False))
        console.print(f"wrote {output}")


@command(app, "benchmark-train", short_help="Seconds per training iteration of presets.")
def benchmark_train(
    preset: str = typer.Option(DEFAULT_PRESETS, help="Comma-separated presets."),
    backbone: str | None = typer.Option(None, help="Backbone for every preset (r50, swin-t, a timm ResNet)."),
    input_size: str = typer.Option("800x1066", help="HEIGHTxWIDTH of the random images."),
    batch_sizes: str = typer.Option("1", help="Comma-separated batch sizes."),
    iters: int = typer.Option(3, "--iters", "--repeats", min=1, help="Timed iterations (the median is reported)."),
    warmup: int = typer.Option(1, min=0, help="Untimed iterations first."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: torch's)."),
    output: Path | None = typer.Option(None, help="Report folder (default reports/<name>)."),
    name: str = typer.Option("train_step", help="Report name: reports/<name>."),
) -> None:
    """Seconds per training iteration (forward, weighted loss, backward, clipping, the AdamW step of each preset's
    recipe) on random images, written to train_step.csv/.md."""
    from sparse_detr.analysis.train_step import TRAIN_STEP_COLUMNS, write_train_step_report

    height, width = parse_size(input_size)
    frame, paths = write_train_step_report(
        parse_list(preset, str, "--preset"), height, width, tuple(parse_list(batch_sizes, int, "--batch-sizes")),
        backbone, iters, warmup, device, threads, output or Path("reports") / name,
    )  # fmt: skip
    print_frame(frame[list(TRAIN_STEP_COLUMNS)], f"seconds per training iteration, {input_size}", TRAIN_STEP_HEADERS)
    console.print(f"wrote {', '.join(str(path) for path in paths)}", highlight=False)
