"""``sdetr eval`` and ``sdetr predict``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from sparse_detr.cli._app import CONFIG_OPTION, SET_OPTION, app, command, console
from sparse_detr.errors import InputError, UsageError

CHECKPOINT_HELP = "Checkpoint file, run folder or zoo name (default: runs/tiny/checkpoint.pth, from `sdetr train`)."


RUNTIME_OPTION = typer.Option(None, help="With --onnx: onnxruntime (default) or openvino (the openvino extra).")


@command(app, "eval")
def evaluate(
    checkpoint: str | None = typer.Option(None, help="Checkpoint file, run folder or zoo name (sdetr zoo)."),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    root: Path | None = typer.Option(None, "--data", help="Dataset folder (COCO 2017 or synth): its validation split."),
    val_images: Path | None = typer.Option(None, help="Validation images folder (custom dataset)."),
    val_ann: Path | None = typer.Option(None, help="Validation instances JSON (custom dataset)."),
    keep_ratio: float | None = typer.Option(None, "--rho", help="Keep ratio at inference instead of the trained one."),
    eval_batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Images per forward pass (default 2, as the reference)."
    ),
    image_size: int | None = typer.Option(None, help="Shorter side (default: the run's, else 800)."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    amp: str | None = typer.Option(
        None, help="Run under autocast: bf16 (CPUs with AMX or AVX512-BF16, GPUs) or fp16 (GPUs)."
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (compiles per image size)."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes (default 2)."),
    allow_other_categories: bool | None = typer.Option(
        None, "--allow-other-categories", help="Evaluate although the checkpoint names other categories."
    ),
    output_dir: Path | None = typer.Option(
        None, help="Where the metrics and detections JSON go (default: the checkpoint's folder; runs/eval/NAME)."
    ),
    onnx: Path | None = typer.Option(None, help="Evaluate this file from `sdetr export` instead of a checkpoint."),
    runtime: str | None = RUNTIME_OPTION,
) -> None:
    """Evaluate a checkpoint with COCO AP on a validation split (the built-in one when no data is given).

    --config/--set take the same files and keys as `sdetr train` (a run's config.toml included): [data]
    names the split, [model] fields change the loaded model (model.keep_ratio), [train] image_size,
    eval_batch_size, workers and device apply. --onnx FILE evaluates an exported file on the CPU with
    onnxruntime or --runtime openvino (its keep ratio and classes are those stored at export).
    """
    fields = dict(locals())  # the options named after configuration fields, taken before anything else
    for name in ("checkpoint", "config_file", "settings", "output_dir", "compile", "onnx", "runtime"):
        del fields[name]
    from sparse_detr.engine import distributed, format_metrics
    from sparse_detr.engine.evaluate import evaluate_settings
    from sparse_detr.engine.run_config import EvalSettings, merged_settings, option_settings

    resolved = merged_settings(config_file, settings or (), option_settings(fields))
    eval_settings = EvalSettings.from_settings(resolved, compile=compile)
    if (checkpoint is None) == (onnx is None):
        raise UsageError("give --checkpoint (a checkpoint file, run folder or zoo name) or --onnx FILE, not both")
    if onnx is not None:
        from sparse_detr.inference import evaluate_onnx

        metrics = evaluate_onnx(onnx, eval_settings, output_dir, runtime or "onnxruntime")
    elif runtime is not None:
        raise UsageError(f"--runtime {runtime} runs an exported file: add --onnx FILE (from `sdetr export`)")
    else:
        metrics = evaluate_settings(checkpoint, eval_settings, output_dir)
    if distributed.get_rank() == 0:  # under torchrun every process has the metrics; the table prints once
        console.print(format_metrics(metrics))


@command(app)
def predict(
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (quote the globs)."),
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
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
    amp: str | None = typer.Option(
        None, help="Run under autocast: bf16 (CPUs with AMX or AVX512-BF16, GPUs) or fp16 (GPUs)."
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (compiles per image size)."),
    onnx: Path | None = typer.Option(
        None, help="Run this file from `sdetr export` with onnxruntime instead of a checkpoint."
    ),
    runtime: str | None = RUNTIME_OPTION,
) -> None:
    """Detect objects in images: COCO results JSON (image_id, category_id, bbox [x, y, w, h] in pixels, score,
    plus category_name and file_name) and a table on screen. One image that fails costs that image only."""
    from rich.progress import track

    from sparse_detr.inference import predict_files

    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it or choose another --out")
    results, failures, paths = predict_files(
        images, checkpoint, out, threshold, ann, rho, device, image_size,
        track=lambda items: track(items, "detecting", console=console), amp=amp, compile=compile, onnx=onnx,
        runtime=runtime,
    )  # fmt: skip
    shown = 50
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
