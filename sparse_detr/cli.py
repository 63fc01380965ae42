"""The ``sdetr`` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Sparse DETR and Deformable DETR: train, evaluate, benchmark, ablate and visualize.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _not_implemented(command: str) -> None:
    console.print(f"[red]sdetr {command} is not implemented yet[/red] (see the project's open issues)")
    raise typer.Exit(code=2)


data_app = typer.Typer(help="Datasets: the built-in synthetic dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Folder to write the dataset to (COCO format: PNG + instances JSON)."),
    num_train: int = typer.Option(500, min=1, help="Training images."),
    num_val: int = typer.Option(100, min=1, help="Validation images."),
    image_size: int = typer.Option(160, min=32, help="Side of the square images, in pixels."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same dataset."),
) -> None:
    """Write the built-in synthetic detection dataset (train and val splits)."""
    from sparse_detr.data import make_synthetic_dataset

    root = make_synthetic_dataset(out, num_train, num_val, image_size, seed)
    console.print(f"wrote the synthetic dataset to {root}")


def _data_splits(data, train_images, train_ann, val_images, val_ann):
    """(train_images, train_ann, val_images, val_ann): a COCO root, explicit paths, or the built-in set."""
    from sparse_detr.data import make_synthetic_dataset, resolve_coco_root, synthetic_splits

    explicit = (train_images, train_ann, val_images, val_ann)
    if data is not None:
        return resolve_coco_root(data)
    if any(explicit):
        if not all(explicit):
            raise typer.BadParameter("give all of --train-images --train-ann --val-images --val-ann, or --data")
        return explicit
    console.print("no data given: using the built-in synthetic dataset")
    return synthetic_splits(make_synthetic_dataset())


@app.command()
def train(
    preset: str = typer.Option("tiny", help="Model preset (see sparse_detr.config.PRESETS)."),
    backbone: str | None = typer.Option(None, help="Backbone instead of the preset's (r50, swin-t, resnet18...)."),
    rho: float | None = typer.Option(None, help="Keep ratio instead of the preset's."),
    data: Path | None = typer.Option(None, help="COCO root with train2017/, val2017/, annotations/."),
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
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Train a model; with no data, the tiny preset on the built-in synthetic dataset.

    Unset options take the preset's training recipe (SPEC §6 for the paper's presets, a CPU recipe for
    tiny; see sparse_detr.engine.train_recipe). Works under torchrun (several GPUs, or CPU processes with
    gloo). The run folder gets the checkpoint, metrics.jsonl, per-epoch evaluations and
    metrics_final.json; an interrupted run resumes from it.
    """
    from sparse_detr.config import apply_overrides, get_preset
    from sparse_detr.engine import NonFiniteLossError, build_datasets, format_metrics, train_recipe
    from sparse_detr.engine import train as run_training

    config = get_preset(preset, backbone)
    if rho is not None:
        config = apply_overrides(config, {"model.keep_ratio": rho})
    splits = _data_splits(data, train_images, train_ann, val_images, val_ann)
    options = {
        "epochs": epochs, "lr_drop": lr_drop, "batch_size": batch_size, "lr": lr, "lr_backbone": lr_backbone,
        "clip_max_norm": clip_max_norm, "image_size": image_size, "amp": amp, "grad_accum": grad_accum,
        "seed": seed, "workers": workers, "iters_per_epoch": iters_per_epoch,
        "checkpoint_every_iters": checkpoint_every_iters, "output_dir": str(output_dir) if output_dir else None,
        "resume": str(resume) if resume else None, "device": device,
    }  # fmt: skip
    try:
        train_config = train_recipe(preset, **{key: value for key, value in options.items() if value is not None})
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    image_size = train_config.image_size
    train_set, val_set = build_datasets(*splits, image_size=image_size)
    try:
        metrics = run_training(config, train_config, train_set, val_set)
    except NonFiniteLossError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(code=1) from None
    console.print(format_metrics(metrics))
    console.print(f"run folder: {train_config.output_dir}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., help="Checkpoint: this project's or a released one."),
    data: Path | None = typer.Option(None, help="COCO root (its val2017 split is evaluated)."),
    val_images: Path | None = typer.Option(None, help="Validation images folder (custom dataset)."),
    val_ann: Path | None = typer.Option(None, help="Validation instances JSON (custom dataset)."),
    rho: float | None = typer.Option(None, help="Keep ratio at inference instead of the trained one."),
    batch_size: int = typer.Option(2, min=1, help="Images per forward pass (the reference used 2)."),
    image_size: int | None = typer.Option(None, help="Shorter side (default: the run's, else 800)."),
    output_dir: Path | None = typer.Option(None, help="Where the metrics and detections JSON go."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    workers: int = typer.Option(2, min=0, help="Data loading processes."),
) -> None:
    """Evaluate a checkpoint with COCO AP on a validation split (the built-in one when no data is given)."""
    from sparse_detr.engine import evaluate_checkpoint, format_metrics

    if not checkpoint.is_file():
        raise typer.BadParameter(f"checkpoint not found: {checkpoint}")
    if val_images is None or val_ann is None:
        _, _, val_images, val_ann = _data_splits(data, None, None, None, None)
    metrics = evaluate_checkpoint(
        checkpoint, val_images, val_ann, output_dir=output_dir, keep_ratio=rho, batch_size=batch_size,
        image_size=image_size, device=device, workers=workers,
    )  # fmt: skip
    console.print(format_metrics(metrics))


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _parse_size(size: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH such as 800x1066, got {size!r}") from None
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


@app.command()
def benchmark(
    op: bool = typer.Option(False, "--op", help="Time the deformable attention op backends instead of models."),
    preset: str = typer.Option("deformable-topk-bbr,sparse-rho0.1", help="Comma-separated presets to time."),
    backbone: str | None = typer.Option(None, help="Backbone for every preset (r50, swin-t, a timm ResNet)."),
    rho: str | None = typer.Option(None, help="Comma-separated keep ratios applied to the sparse presets."),
    input_size: str = typer.Option("800x1066", help="HEIGHTxWIDTH of the synthetic input image."),
    batch_size: int = typer.Option(1, min=1, help="Images per forward pass."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: torch's)."),
    backends: str = typer.Option("pytorch,cpu,cuda", help="With --op: op backends to time."),
    repeats: int = typer.Option(3, min=1, help="Timed repetitions per measurement (median reported)."),
    dtype: str = typer.Option("float32", help="With --op: float32, float64, float16 or bfloat16."),
    output: Path | None = typer.Option(None, help="Also write the table as CSV to this file."),
) -> None:
    """Time models (forward latency, peak memory) or, with --op, the deformable attention op backends.

    Each model is measured in a fresh process with random weights; the ratio column compares every row
    with the first. FLOPs and FPS reports come with the full benchmark (see the open issues).
    """
    if op:
        from sparse_detr.analysis.op_benchmark import DEFAULT_SHAPES, run_op_benchmark

        frame = run_op_benchmark(_split(backends), repeats=repeats, dtype=dtype, log=console.print)
        _print_frame(frame, f"ms_deform_attn, {dtype}: median ms of {repeats} (speed-up vs pytorch)")
        for shape in DEFAULT_SHAPES:
            console.print(f"  {shape.name}: {shape.description}")
    else:
        import pandas as pd
        import torch

        from sparse_detr.analysis.latency import LatencyRequest, measure_latency_isolated
        from sparse_detr.config import get_preset

        height, width = _parse_size(input_size)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = []
        for name in _split(preset):
            sparse = get_preset(name, backbone).model.keep_ratio > 0
            for keep_ratio in [float(r) for r in _split(rho)] if (rho and sparse) else [None]:
                request = LatencyRequest(
                    name, backbone, keep_ratio, height, width, batch_size, repeats, 1, threads, device
                )
                with console.status(f"timing {name}" + (f" at rho {keep_ratio}" if keep_ratio else "")):
                    result = measure_latency_isolated(request)
                rows.append(result)
        frame = pd.DataFrame(rows)
        frame["ratio_to_first"] = frame["median_s"].iloc[0] / frame["median_s"]
        columns = [
            "preset",
            "backbone",
            "keep_ratio",
            "kept_tokens",
            "tokens",
            "batch",
            "threads",
            "median_s",
            "min_s",
            "max_s",
            "ratio_to_first",
            "peak_rss_mib",
        ]
        frame = frame[columns + (["peak_cuda_mib"] if "peak_cuda_mib" in frame else [])]
        _print_frame(frame, f"forward latency, {input_size}, {device}, median of {repeats} after a warm-up")
    if output is not None:
        from sparse_detr.utils.io import atomic_write_text

        atomic_write_text(output, frame.to_csv(index=False))
        console.print(f"wrote {output}")


@app.command()
def ablate() -> None:
    """Run sparsity ablations (not implemented yet)."""
    _not_implemented("ablate")


@app.command()
def visualize() -> None:
    """Draw encoder saliency maps (not implemented yet)."""
    _not_implemented("visualize")


@app.command()
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
