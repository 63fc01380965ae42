"""The ``sdetr`` command line.

Every command reports the project's own errors (:mod:`sparse_detr.errors`: a bad option, file or setting,
a missing download or device) as one red line and exit code 2 (usage) or 1 (failure); ``--debug`` or
``SDETR_DEBUG=1`` shows their traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparse_detr.errors import SparseDetrError, UsageError

app = typer.Typer(
    help="Sparse DETR and Deformable DETR: train, evaluate, benchmark, ablate and visualize.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
_debug = {"on": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="SDETR_DEBUG", help="Show the traceback of errors."),
) -> None:
    _debug["on"] = debug
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _command(typer_app: typer.Typer, *args, **kwargs):
    """``typer_app.command(...)`` whose function reports :class:`~sparse_detr.errors.SparseDetrError` as one
    red line with its exit code (its traceback with --debug)."""

    def register(function):
        @functools.wraps(function)
        def run(*call_args, **call_kwargs):
            try:
                return function(*call_args, **call_kwargs)
            except SparseDetrError as error:
                if _debug["on"]:
                    raise
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=error.exit_code) from None

        return typer_app.command(*args, **kwargs)(run)

    return register


data_app = typer.Typer(help="Datasets: the built-in synthetic dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@_command(data_app, "synth")
def data_synth(
    out: Path = typer.Option(..., help="Folder to write the dataset to (COCO format: PNG + instances JSON)."),
    num_train: int = typer.Option(500, min=1, help="Training images."),
    num_val: int = typer.Option(100, min=1, help="Validation images."),
    image_size: int = typer.Option(160, min=32, help="Side of the square images, in pixels."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same dataset."),
    classes: str | None = typer.Option(
        None, help="Comma-separated shape classes, in label order (default: the built-in six; see --help)."
    ),
) -> None:
    """Write the built-in synthetic detection dataset (train and val splits).

    Classes: circle, square, triangle, star, ring, cross (the default set) and hexagon, diamond, crescent,
    arrow; another class set (e.g. --classes triangle,star,hexagon,arrow --seed 1) makes a second dataset
    to fine-tune on.
    """
    from sparse_detr.data import make_synthetic_dataset

    chosen = _split(classes) if classes is not None else None
    root = make_synthetic_dataset(out, num_train, num_val, image_size, seed, classes=chosen)
    console.print(f"wrote the synthetic dataset to {root}")


@_command(app)
def zoo() -> None:
    """The released checkpoints: names for --checkpoint (eval, predict, visualize, benchmark) and --init."""
    from sparse_detr.zoo import ZOO_NOTE, zoo_dir, zoo_table

    table = Table(title="released Sparse DETR checkpoints (COCO 2017 val)")
    table.add_column("name", no_wrap=True)
    for column in ("AP", "params", "GFLOPs", "FPS b4", "cached"):
        table.add_column(column, justify="right")
    for row in zoo_table().itertuples(index=False):
        table.add_row(row.name, f"{row.AP:.1f}", f"{row.params_M:.1f}M", f"{row.GFLOPs:.1f}", f"{row.FPS_b4:.1f}",
                      "yes" if row.cached else "")  # fmt: skip
    console.print(table)
    console.print(f"{ZOO_NOTE}.\ncache: {zoo_dir()} (SDETR_ZOO_DIR); links: SDETR_ZOO_URL or the authors' release",
                  highlight=False, soft_wrap=True)  # fmt: skip


CONFIG_OPTION = typer.Option(
    None, "--config", help="TOML config file: [model], [loss], [train], [data] tables (a run's config.toml too)."
)
SET_OPTION = typer.Option(
    None, "--set", help="key=value over the config, repeatable: model.keep_ratio=0.2, train.lr=1e-4."
)


@_command(app)
def train(
    preset: str | None = typer.Option(
        None, help="Model preset (sparse_detr.config.PRESETS); default: tiny on the built-in dataset, or --init's."
    ),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved configuration and exit."),
    backbone: str | None = typer.Option(None, help="Backbone instead of the preset's (r50, swin-t, resnet18...)."),
    pretrained_backbone: str | None = typer.Option(
        None, help="Backbone start: imagenet (the reference's), timm, a weights file, or none (random)."
    ),
    init: str | None = typer.Option(
        None, help="Fine-tune: start a new run from this checkpoint (file, run folder or zoo name)."
    ),
    rho: float | None = typer.Option(None, help="Keep ratio instead of the preset's."),
    data: Path | None = typer.Option(
        None, help="Dataset folder: COCO 2017 (train2017/, val2017/, annotations/) or one of sdetr data synth."
    ),
    train_images: Path | None = typer.Option(None, help="Training images folder (custom dataset)."),
    train_ann: Path | None = typer.Option(None, help="Training instances JSON (custom dataset)."),
    val_images: Path | None = typer.Option(None, help="Validation images folder (custom dataset)."),
    val_ann: Path | None = typer.Option(None, help="Validation instances JSON (custom dataset)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (default: the preset's recipe)."),
    lr_drop: int | None = typer.Option(None, min=1, help="Epoch after which lr drops x0.1."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per step and process."),
    lr: float | None = typer.Option(None, help="Learning rate for a total batch of 16 (scaled by sqrt(batch/16))."),
    lr_backbone: float | None = typer.Option(None, help="Backbone learning rate for a total batch of 16."),
    clip_max_norm: float | None = typer.Option(None, help="Gradient clipping norm (0: off)."),
    image_size: int | None = typer.Option(None, min=32, help="Evaluation shorter side; training scales follow it."),
    amp: str | None = typer.Option(None, help="Mixed precision: bf16 or fp16."),
    grad_accum: int | None = typer.Option(None, min=1, help="Batches per optimizer step."),
    seed: int | None = typer.Option(None, help="Seed of weights, data order and augmentation."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes."),
    iters_per_epoch: int | None = typer.Option(None, min=1, help="Cap on batches per epoch (quick runs)."),
    checkpoint_every_iters: int | None = typer.Option(None, min=0, help="Also checkpoint every N steps."),
    output_dir: Path | None = typer.Option(None, help="Run folder (default runs/<preset>)."),
    resume: Path | None = typer.Option(None, help="Checkpoint (or run folder) to resume from."),
    tensorboard: bool | None = typer.Option(
        None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard event files (the tensorboard extra)."
    ),
    allow_other_categories: bool | None = typer.Option(
        None, "--allow-other-categories", help="Resume although the data names other categories."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Train a model; with no data, the tiny preset on the built-in synthetic dataset.

    The configuration is resolved in layers: the preset (and its training recipe: SPEC §6 for the paper's
    presets, a CPU recipe for tiny) < --config FILE < --set key=value < the options above. The paper
    presets start from the reference's ImageNet backbone (--pretrained-backbone); --init CHECKPOINT
    fine-tunes a released or own checkpoint on this data instead. Works under torchrun (several GPUs, or CPU
    processes with gloo). The run folder gets config.toml, the checkpoint, metrics.jsonl, per-epoch
    evaluations and metrics_final.json; an interrupted run resumes from it.
    """
    from sparse_detr.engine import build_datasets, format_metrics
    from sparse_detr.engine import train as run_training
    from sparse_detr.engine.checkpointing import find_resume_path
    from sparse_detr.engine.initialization import init_model_config, resolve_initial_weights
    from sparse_detr.engine.run_config import merged_settings, resolve_run_config
    from sparse_detr.engine.trainer import check_input_size
    from sparse_detr.utils.device import resolve_device
    from sparse_detr.utils.io import check_writable

    options = {
        "preset": preset, "model.backbone": backbone, "model.pretrained_backbone": pretrained_backbone,
        "model.keep_ratio": rho, "train.init": init, "data.root": data, "data.train_images": train_images,
        "data.train_ann": train_ann, "data.val_images": val_images, "data.val_ann": val_ann,
        "train.epochs": epochs, "train.lr_drop": lr_drop, "train.batch_size": batch_size, "train.lr": lr,
        "train.lr_backbone": lr_backbone, "train.clip_max_norm": clip_max_norm, "train.image_size": image_size,
        "train.amp": amp, "train.grad_accum": grad_accum, "train.seed": seed, "train.workers": workers,
        "train.iters_per_epoch": iters_per_epoch, "train.checkpoint_every_iters": checkpoint_every_iters,
        "train.output_dir": output_dir, "train.resume": resume, "train.tensorboard": tensorboard,
        "train.device": device, "train.allow_other_categories": allow_other_categories,
    }  # fmt: skip
    resolved = merged_settings(config_file, settings or (), _as_strings(options))
    init_source = resolved.get("train.init")
    base = init_model_config(init_source) if init_source and "preset" not in resolved else None
    run = resolve_run_config(resolved, base)
    if print_config:
        console.print(run.to_toml(), markup=False, highlight=False, soft_wrap=True)
        return
    resolve_device(run.train.device)
    check_input_size(run.config, run.train)
    check_writable(run.train.output_dir)
    weights = None
    single_process = int(os.environ.get("WORLD_SIZE", 1)) == 1
    if single_process and find_resume_path(run.train.output_dir, run.train.resume, run.train.auto_resume) is None:
        weights = resolve_initial_weights(run.config, run.train.init)  # before any work
    if run.data.is_builtin:
        console.print("no data given: using the built-in synthetic dataset")
    train_set, val_set = build_datasets(*run.data.splits(), image_size=run.train.image_size)
    metrics = run_training(run.config, run.train, train_set, val_set, weights)
    console.print(format_metrics(metrics))
    console.print(f"run folder: {run.train.output_dir}")


def _as_strings(options: dict) -> dict:
    """Option values as config values: paths become strings."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}


@_command(app, "eval")
def evaluate(
    checkpoint: str = typer.Option(..., help="Checkpoint file, run folder or zoo name (sdetr zoo)."),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    data: Path | None = typer.Option(None, help="Dataset folder (COCO 2017 or synth): its validation split."),
    val_images: Path | None = typer.Option(None, help="Validation images folder (custom dataset)."),
    val_ann: Path | None = typer.Option(None, help="Validation instances JSON (custom dataset)."),
    rho: float | None = typer.Option(None, help="Keep ratio at inference instead of the trained one."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per forward pass (default 2, as the reference)."),
    image_size: int | None = typer.Option(None, help="Shorter side (default: the run's, else 800)."),
    output_dir: Path | None = typer.Option(
        None, help="Where the metrics and detections JSON go (default: the checkpoint's folder; runs/eval/NAME)."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes (default 2)."),
    allow_other_categories: bool = typer.Option(
        False, "--allow-other-categories", help="Evaluate although the checkpoint names other categories."
    ),
) -> None:
    """Evaluate a checkpoint with COCO AP on a validation split (the built-in one when no data is given).

    --config/--set take the same files and keys as `sdetr train` (a run's config.toml included): [data]
    names the split, [model] fields change the loaded model (model.keep_ratio), [train] image_size,
    eval_batch_size, workers and device apply.
    """
    from sparse_detr.data.source import DataSource
    from sparse_detr.engine import evaluate_checkpoint, format_metrics
    from sparse_detr.engine.run_config import merged_settings, section
    from sparse_detr.zoo import ZOO, resolve_checkpoint

    options = {
        "data.root": data, "data.val_images": val_images, "data.val_ann": val_ann, "model.keep_ratio": rho,
        "train.eval_batch_size": batch_size, "train.image_size": image_size, "train.device": device,
        "train.workers": workers,
    }  # fmt: skip
    resolved = merged_settings(config_file, settings or (), _as_strings(options))
    train_settings = section(resolved, "train")
    overrides = {key: value for key, value in resolved.items() if key.startswith(("model.", "loss."))}
    path = resolve_checkpoint(checkpoint)
    if output_dir is None and checkpoint in ZOO and not Path(checkpoint).exists():
        output_dir = Path("runs") / "eval" / checkpoint  # not into the download cache
    split = DataSource(**section(resolved, "data")).val_split()
    metrics = evaluate_checkpoint(
        path, *split, output_dir=output_dir, keep_ratio=overrides.pop("model.keep_ratio", None),
        batch_size=train_settings.get("eval_batch_size", 2), image_size=train_settings.get("image_size"),
        device=train_settings.get("device"), workers=train_settings.get("workers", 2), overrides=overrides,
        allow_other_categories=allow_other_categories,
    )  # fmt: skip
    console.print(format_metrics(metrics))


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _parse_size(size: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"expected HEIGHTxWIDTH such as 800x1066, got {size!r}") from None
    return height, width


def _format_cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3f}"  # NaN: not applicable
    return str(value)


def _print_frame(frame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "fi" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(_format_cell(v) for v in row))
    console.print(table)


@_command(app)
def benchmark(
    op: bool = typer.Option(False, "--op", help="Time the deformable attention op backends instead of models."),
    train_step: bool = typer.Option(
        False, "--train", help="Time training iterations (forward, loss, backward, AdamW step) instead."
    ),
    preset: str | None = typer.Option(
        None, help="Comma-separated presets (default deformable-topk-bbr,sparse-rho0.1; with --checkpoint: one)."
    ),
    backbone: str | None = typer.Option(None, help="Backbone for every preset (r50, swin-t, a timm ResNet)."),
    rho: str | None = typer.Option(None, help="Comma-separated keep ratios applied to the sparse models."),
    checkpoint: str | None = typer.Option(None, help="Measure this checkpoint: a file, run folder or zoo name."),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    input_size: str = typer.Option("850x1040", help="HEIGHTxWIDTH of the one synthetic image (reference quick mode)."),
    images: int | None = typer.Option(
        None, min=1, help="Use the first N validation images instead (the paper: 100 COCO val2017 images)."
    ),
    data: Path | None = typer.Option(None, help="With --images: COCO root (its val2017 split)."),
    val_images: Path | None = typer.Option(None, help="With --images: validation images folder."),
    val_ann: Path | None = typer.Option(None, help="With --images: validation instances JSON."),
    image_size: int | None = typer.Option(
        None, min=32, help="With --images: shorter side, as evaluation resizes (default: the config's, else 800)."
    ),
    fps: bool = typer.Option(True, "--fps/--no-fps", help="Time the models."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count GFLOPs with fvcore."),
    batch_sizes: str = typer.Option("1,4", help="Comma-separated batch sizes to time."),
    iters: int | None = typer.Option(
        None, "--iters", "--repeats", min=1, help="Timed passes (default 50 on GPU, 5 on CPU; --op: 3)."
    ),
    warmup: int | None = typer.Option(None, min=0, help="Untimed passes first (default 5 on GPU, 1 on CPU)."),
    amp: str | None = typer.Option(None, help="Time under autocast: bf16 or fp16."),
    compile: bool = typer.Option(False, "--compile", help="Time torch.compile(model)."),
    isolate: bool | None = typer.Option(
        None, "--isolate/--no-isolate", help="Time each model in a fresh process (default: on CPU, for peak RSS)."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: torch's)."),
    backends: str = typer.Option("pytorch,cpu,cuda", help="With --op: op backends to time."),
    dtype: str = typer.Option("float32", help="With --op: float32, float64, float16 or bfloat16."),
    output: Path | None = typer.Option(
        None, help="Report folder (default reports/<name>); with --op: a CSV file for the table."
    ),
    name: str = typer.Option("benchmark", help="Report name: reports/<name>."),
) -> None:
    """Parameters, GFLOPs (fvcore) and FPS of models over presets and keep ratios; or, with --op, the
    deformable attention op backends. --config/--set [model]/[loss] fields change every model.

    Writes benchmark.csv/.md, gflops_by_part.csv/.md, gflops_vs_rho.png and fps_vs_rho.png. GFLOPs follow the
    paper's convention (docs/PERFORMANCE.md) and sit beside the reference implementation's figures where
    they exist (850x1040, 800x1066, 800x1333); FPS is the median over the timed passes.
    """
    if op:
        from sparse_detr.analysis.op_benchmark import DEFAULT_SHAPES, run_op_benchmark

        repeats = iters or 3
        frame = run_op_benchmark(_split(backends), repeats=repeats, dtype=dtype, log=console.print)
        _print_frame(frame, f"ms_deform_attn, {dtype}: median ms of {repeats} (speed-up vs pytorch)")
        for shape in DEFAULT_SHAPES:
            console.print(f"  {shape.name}: {shape.description}")
        if output is not None:
            from sparse_detr.utils.io import atomic_write_text

            atomic_write_text(output, frame.to_csv(index=False))
            console.print(f"wrote {output}")
        return
    if train_step:
        _benchmark_train_step(preset, backbone, input_size, batch_sizes, iters, warmup, device, threads, output, name)
        return
    import torch

    from sparse_detr.analysis import benchmark as bench

    if amp is not None and amp not in ("bf16", "fp16"):
        raise UsageError(f"--amp must be bf16 or fp16, got {amp!r}")
    sizes = _numbers(batch_sizes, int, "--batch-sizes")
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes needs positive integers, got {batch_sizes!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = bench.BenchmarkOptions(
        flops=flops, fps=fps, batch_sizes=tuple(sorted(set(sizes))), warmup=warmup, iters=iters, amp=amp,
        compile=compile, device=device, threads=threads, isolate=isolate,
    )  # fmt: skip
    from sparse_detr.data.source import DataSource
    from sparse_detr.engine.run_config import merged_settings, section
    from sparse_detr.utils.io import check_writable
    from sparse_detr.zoo import resolve_checkpoint

    options_given = {"data.root": data, "data.val_images": val_images, "data.val_ann": val_ann,
                     "train.image_size": image_size}  # fmt: skip
    resolved = merged_settings(config_file, settings or (), _as_strings(options_given))
    overrides = {key: value for key, value in resolved.items() if key.startswith(("model.", "loss."))}
    presets = _split(preset) if preset else ([] if checkpoint else ["deformable-topk-bbr", "sparse-rho0.1"])
    keep_ratios = _numbers(rho, float, "--rho") if rho else None
    path = str(resolve_checkpoint(checkpoint)) if checkpoint else None
    specs = bench.model_specs(presets, keep_ratios, backbone, path, overrides)
    eval_size = section(resolved, "train").get("image_size", 800)
    source_data = DataSource(**section(resolved, "data"))
    inputs, size, source = _benchmark_inputs(input_size, images, source_data, eval_size)
    check_writable(output or Path("reports") / name)
    result = bench.run_benchmark(specs, inputs, options, size, log=lambda text: console.print(f"measuring {text}"))
    notes = bench.report_notes(result.table, options, source, result.skipped)
    paths = bench.write_benchmark_report(result, output or Path("reports") / name, notes, f"Benchmark: {source}")
    _print_frame(bench.summary(result.table), f"benchmark on {device}: {source}")
    if flops:
        console.print("fvcore skipped (element-wise) ops: " + ", ".join(sorted(result.skipped)), highlight=False)
    console.print(f"wrote {', '.join(str(path) for path in paths)}", highlight=False)


def _benchmark_train_step(preset, backbone, input_size, batch_sizes, iters, warmup, device, threads, output, name):
    """``sdetr benchmark --train``: seconds per training iteration on one random image size."""
    import torch

    from sparse_detr.analysis.report import write_table
    from sparse_detr.analysis.train_step import train_step_table

    if threads:
        torch.set_num_threads(threads)
    height, width = _parse_size(input_size)
    sizes = tuple(_numbers(batch_sizes, int, "--batch-sizes"))
    iters, warmup = iters or 3, 1 if warmup is None else warmup
    presets = _split(preset) if preset else ["deformable-topk-bbr", "sparse-rho0.1"]
    try:
        frame = train_step_table(
            presets, height, width, sizes, backbone, iters, warmup, device or "cpu", log=console.print
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    notes = [
        f"One random {height}×{width} image per batch entry with 7 random boxes; median of {iters} iterations "
        f"after {warmup} warm-up; each iteration is the forward pass, the weighted loss, the backward pass, "
        "gradient clipping and the AdamW step of the preset's training recipe (no data loading).",
    ]
    paths = write_table(frame, output or Path("reports") / name, "train_step", f"Training step: {input_size}", notes)
    shown = ["preset", "backbone", "rho", "batch_size", "s_per_iter", "images_per_s", "speedup_vs_first"]
    _print_frame(frame[shown], f"seconds per training iteration, {input_size}")
    console.print(f"wrote {', '.join(str(path) for path in paths)}", highlight=False)


def _numbers(values: str, kind, option: str) -> list:
    try:
        return [kind(value) for value in _split(values)]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, got {values!r}") from None


def _benchmark_inputs(input_size, images, data, image_size):
    """(images, (H, W) of the synthetic image or None, a description) for ``sdetr benchmark``; ``data`` is
    the DataSource whose validation split gives the first ``images`` images."""
    from sparse_detr.analysis.benchmark import dataset_images, synthetic_image

    if images is None:
        height, width = _parse_size(input_size)
        return [synthetic_image(height, width)], (height, width), f"one random {height}×{width} image"
    val_images, val_ann = data.val_split()
    description = f"the first {images} images of {val_images}, shorter side {image_size} (mean over them)"
    return dataset_images(val_images, val_ann, images, image_size), None, description


@_command(app)
def ablate(
    experiment: Path | None = typer.Argument(None, help="Sweep file (experiments/*.toml); default: the built-in one."),
    criterion: str | None = typer.Option(None, help="Comma-separated token criteria: dam, oam, random."),
    rho: str | None = typer.Option(None, help="Comma-separated keep ratios to train at."),
    preset: str | None = typer.Option(None, help="Model preset (without a file: tiny, the default ablation)."),
    backbone: str | None = typer.Option(None, help="Backbone instead of the preset's (r50, swin-t, resnet18...)."),
    data: Path | None = typer.Option(None, help="COCO root with train2017/, val2017/, annotations/."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs of every run."),
    iters_per_epoch: int | None = typer.Option(None, min=1, help="Cap on batches per epoch (quick runs)."),
    baseline: bool | None = typer.Option(None, "--baseline/--no-baseline", help="Train the unsparsified baseline."),
    random_selection: bool | None = typer.Option(None, "--random/--no-random", help="Also random tokens at each ρ."),
    no_enc_aux: bool = typer.Option(False, "--no-enc-aux", help="Also each run without the encoder aux loss."),
    eval_rho: str | None = typer.Option(None, help="Comma-separated keep ratios for the inference-time sweep."),
    eval_train_rho: float | None = typer.Option(None, help="Keep ratio of the inference-time sweep's model."),
    name: str | None = typer.Option(None, help="Sweep name: reports/<name>, runs/ablate/<name>."),
    output: Path | None = typer.Option(None, help="Report folder (default reports/<name>)."),
    runs_dir: Path | None = typer.Option(None, help="Folder of the run folders (default runs/ablate/<name>)."),
    shard: str | None = typer.Option(None, help="I/N: run only the runs at positions p with p % N == I."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the report from finished runs."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:I (default: cuda when available)."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes."),
) -> None:
    """Train and compare token-sparsity variants: keep ratios, DAM/OAM/random criteria, encoder aux loss.

    One run per (criterion, ρ), plus the baseline and the inference-time sweep; each is measured (COCO AP,
    GFLOPs, FPS, DAM coverage) into its result.json, and the report (ablation.csv/.md, plots) is rebuilt
    from the finished runs. Re-running skips finished runs and resumes interrupted ones. With no file: the
    default ablation (experiments/default.toml: tiny preset on the built-in dataset, about 30 minutes on
    2 CPU cores), or with --preset that preset's own recipe at ρ 0.1...0.5; options change either.
    """

    from sparse_detr.analysis.ablation import run_ablation, write_sweep_report
    from sparse_detr.analysis.sweep import SweepError, parse_shard, resolve_sweep

    def numbers(values: str | None) -> tuple[float, ...] | None:
        try:
            return None if values is None else tuple(float(v) for v in _split(values))
        except ValueError:
            raise UsageError(f"expected comma-separated numbers such as 0.1,0.3, got {values!r}") from None

    changes = {
        "criteria": tuple(_split(criterion)) if criterion is not None else None, "rho": numbers(rho),
        "preset": preset, "backbone": backbone, "data": str(data) if data else None, "epochs": epochs,
        "iters_per_epoch": iters_per_epoch, "baseline": baseline, "random": random_selection,
        "no_enc_aux": no_enc_aux or None, "eval_rho": numbers(eval_rho), "eval_train_rho": eval_train_rho,
        "name": name, "output": str(output) if output else None, "runs_dir": str(runs_dir) if runs_dir else None,
        "device": device, "workers": workers,
    }  # fmt: skip

    def log(text: str) -> None:
        console.print(text, markup=False, highlight=False)  # run names and TOML tables hold brackets

    sweep = resolve_sweep(experiment, **changes)
    if report_only:
        report = write_sweep_report(sweep, log)
        if report is None:
            raise SweepError(f"no finished runs of {sweep.name} in {sweep.run_root}: run the sweep first")
    else:
        report = run_ablation(sweep, parse_shard(shard) if shard else (0, 1), log)
    if report is not None:  # the columns that fit a terminal; the report files have them all
        costs = ["AP", "AP50", "AP75", "gflops", "fps", "dam_coverage"]
        _print_frame(report.table[["run", *costs]], f"ablation {sweep.name} (AP and DAM coverage in %)")
        if len(report.inference):
            inference = report.inference[["run", "eval_rho", *costs]]
            _print_frame(inference, f"ablation {sweep.name}: inference-time keep ratio")
        console.print(f"report: {sweep.report_dir}")


@_command(app)
def visualize(
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (quote the globs)."),
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint file, run folder or zoo name (default: runs/tiny/checkpoint.pth, from `sdetr train`)."
    ),
    rho: list[str] | None = typer.Option(
        None,
        help="Keep ratio at inference (default: the trained one); several, repeated or comma-separated, "
        "give one row each.",
    ),
    out: Path = typer.Option(Path("visualizations"), help="Folder for the figures (<image stem>_tokens.<format>)."),
    threshold: float = typer.Option(0.3, min=0.0, max=1.0, help="Lowest score of a drawn detection."),
    formats: str = typer.Option("png", "--format", help="Comma-separated figure formats: png, pdf, svg."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing figures."),
    image_size: int | None = typer.Option(
        None, min=16, help="Shorter side the model sees (default: the run's, else 800)."
    ),
) -> None:
    """Draw what the sparse encoder keeps: for each image a figure with the detections, the scoring network's
    saliency per level, the selected tokens per level and combined, the decoder attention map (DAM) and the
    overlap of the selection with the DAM's top tokens; one row per --rho."""
    from rich.progress import track

    from sparse_detr.errors import InputError
    from sparse_detr.inference import expand_image_paths, load_detector
    from sparse_detr.utils.io import check_writable
    from sparse_detr.viz import FIGURE_FORMATS, existing_outputs, figure_stems, require_saliency, visualize_file

    try:
        keep_ratios = [float(value) for text in rho or [] for value in _split(text)] or [None]
    except ValueError:
        raise UsageError(f"--rho takes numbers in (0, 1] such as 0.1 or 0.1,0.3, got {rho}") from None
    chosen = _split(formats)
    if not chosen or set(chosen) - set(FIGURE_FORMATS):
        raise UsageError(f"--format takes a comma-separated subset of {','.join(FIGURE_FORMATS)}")
    paths = expand_image_paths(images)
    stems = figure_stems(paths, out)
    existing = existing_outputs(stems, chosen)
    if existing and not force:
        raise UsageError(
            f"{existing[0]} exists ({len(existing)} figure file(s) would be overwritten): "
            "pass --force to overwrite or choose another --out"
        )
    check_writable(out)
    detector = load_detector(checkpoint, device, image_size)
    for keep_ratio in keep_ratios:
        require_saliency(detector, keep_ratio)
    failed = []
    for path, stem in track(list(zip(paths, stems)), description="drawing", console=console):
        try:
            written = visualize_file(detector, path, stem, keep_ratios, threshold, chosen)
        except InputError as error:  # an unreadable image, or one too small for the model
            console.print(f"[red]{escape(str(error))}[/red]", soft_wrap=True)
            failed.append(path)
            continue
        console.print(f"wrote {', '.join(map(str, written))}", soft_wrap=True)
    if failed:
        raise InputError(f"{len(failed)} of {len(paths)} image(s) could not be drawn (the first: {failed[0]})")


@_command(app)
def predict(
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (quote the globs)."),
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint file, run folder or zoo name (default: runs/tiny/checkpoint.pth, from `sdetr train`)."
    ),
    threshold: float = typer.Option(
        0.3, min=0.0, max=1.0, help="Lowest score kept (0: the 100 best per image, as COCO evaluation wants)."
    ),
    out: Path = typer.Option(Path("detections.json"), help="COCO results JSON to write."),
    ann: Path | None = typer.Option(
        None, help="COCO instances JSON whose image ids to use, matched by file name (default: 1..N in order)."
    ),
    rho: float | None = typer.Option(None, help="Keep ratio at inference instead of the trained one."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
    image_size: int | None = typer.Option(
        None, min=16, help="Shorter side the model sees (default: the run's, else 800)."
    ),
) -> None:
    """Detect objects in images: COCO results JSON (image_id, category_id, bbox [x, y, w, h] in pixels, score,
    plus category_name and file_name) and a table on screen."""
    import json

    from rich.progress import track

    from sparse_detr.errors import InputError
    from sparse_detr.inference import expand_image_paths, image_ids_from_annotations, load_detector, predict_images
    from sparse_detr.utils.io import atomic_write_text, check_writable

    shown = 50
    paths = expand_image_paths(images)
    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it or choose another --out")
    check_writable(out.parent)
    image_ids = image_ids_from_annotations(ann, paths) if ann is not None else None
    detector = load_detector(checkpoint, device, image_size, keep_ratio=rho)
    results, failures = predict_images(
        detector, paths, threshold, image_ids, track=lambda items: track(items, "detecting", console=console)
    )
    atomic_write_text(out, json.dumps(results, indent=1))  # what finished, whatever failed
    table = Table(title=f"detections scoring at least {threshold:g}")
    for column in ("image", "class", "score", "x", "y", "w", "h"):
        table.add_column(column, justify="left" if column in ("image", "class") else "right")
    for result in results[:shown]:
        x, y, w, h = result["bbox"]
        name = Path(result["file_name"]).name
        table.add_row(name, result["category_name"], f"{result['score']:.3f}", *(f"{v:.1f}" for v in (x, y, w, h)))
    console.print(table)
    more = f" (the table shows the first {shown})" if len(results) > shown else ""
    done = len(paths) - len(failures)
    console.print(f"wrote {len(results)} detection(s) of {done} image(s) to {out}{more}", soft_wrap=True)
    for reason in failures.values():
        console.print(f"[red]{escape(reason)}[/red]", soft_wrap=True)
    if failures:
        raise InputError(f"{len(failures)} of {len(paths)} image(s) failed and are not in {out} (listed above)")


@_command(app)
def doctor() -> None:
    """Print versions, devices and which deformable-attention backends run here (and why not)."""
    from sparse_detr.doctor import environment, op_backends

    table = Table(title="environment", show_header=False)
    for key, value in environment().items():
        table.add_row(key, value)
    console.print(table)
    with console.status("checking op backends (the first run compiles the kernels)..."):
        statuses = op_backends()
    backends = Table(title="deformable attention backends")
    backends.add_column("backend")
    backends.add_column("available")
    backends.add_column("detail")
    for status in statuses:
        detail = (
            status.reason
            if not status.available
            else (f"build log: {status.build_log}" if status.build_log else "always available")
        )
        backends.add_row(status.name, "[green]yes[/green]" if status.available else "[red]no[/red]", detail)
    console.print(backends)


if __name__ == "__main__":
    app()
