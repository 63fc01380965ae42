"""``sdetr eval`` and ``sdetr predict``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from sparse_detr.cli._app import (
    CONFIG_OPTION,
    LAST_OPTION,
    SET_OPTION,
    app,
    command,
    console,
    log_line,
    print_frame,
    print_table,
)  # fmt: skip
from sparse_detr.cli._tables import Column
from sparse_detr.errors import InputError, UsageError

CHECKPOINT_HELP = (
    "Checkpoint file, run folder (its best checkpoint; see --last) or zoo name (default: runs/tiny, from `sdetr "
    "train`)."
)


RUNTIME_OPTION = typer.Option(None, help="With --onnx: onnxruntime (default) or openvino (the openvino extra).")


def print_metrics(metrics) -> None:
    """pycocotools' 12 numbers, then each category's AP and AP50 (when the metrics have them)."""
    from sparse_detr.engine.evaluate import format_metrics, per_class_frame

    console.print(format_metrics(metrics), highlight=False)
    if getattr(metrics, "per_class", None):
        print_frame(per_class_frame(metrics), "AP per class (boxes: its ground-truth boxes)")


@command(app, "eval", short_help="Evaluate a checkpoint with COCO AP.")
def evaluate(
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
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
    last: bool = LAST_OPTION,
) -> None:
    """Evaluate a checkpoint with COCO AP on a validation split (the built-in one when no data is given).

    A run folder (--checkpoint runs/NAME) is evaluated with its best checkpoint (--last: its last one) on its
    own validation data, image size and evaluation batch, read from its config.toml, so that it gives back
    the AP the run measured; the options below override them.
    --config/--set take the same files and keys as `sdetr train` (a run's config.toml included): [data]
    names the split, [model] fields change the loaded model (model.keep_ratio), [train] image_size,
    eval_batch_size, workers and device apply. --onnx FILE evaluates an exported file on the CPU with
    onnxruntime or --runtime openvino (its keep ratio and classes are those stored at export).
    """
    fields = dict(locals())  # the options named after configuration fields, taken before anything else
    for name in ("checkpoint", "config_file", "settings", "output_dir", "compile", "onnx", "runtime", "last"):
        del fields[name]
    from sparse_detr.engine import distributed, run_config
    from sparse_detr.engine.evaluate import evaluate_settings

    run_folder = run_config.run_folder_of(checkpoint) if onnx is None else None
    run = run_config.run_folder_settings(run_folder)
    resolved = run_config.merged_settings(config_file, settings or (), run_config.option_settings(fields), run)
    if run and distributed.get_rank() == 0:
        log_line(f"the run's own settings: {run_folder / 'config.toml'} (its validation data, image size and "
                 "batch; options override them)")  # fmt: skip
    eval_settings = run_config.EvalSettings.from_settings(resolved, compile=compile)
    if checkpoint is not None and onnx is not None:
        raise UsageError("give --checkpoint (a checkpoint file, run folder or zoo name) or --onnx FILE, not both")
    if onnx is not None:
        from sparse_detr.inference import evaluate_onnx

        metrics = evaluate_onnx(onnx, eval_settings, output_dir, runtime or "onnxruntime")
    elif runtime is not None:
        raise UsageError(f"--runtime {runtime} runs an exported file: add --onnx FILE (from `sdetr export`)")
    else:
        metrics = evaluate_settings(checkpoint, eval_settings, output_dir, last)
    if distributed.get_rank() == 0:  # under torchrun every process has the metrics; the table prints once
        print_metrics(metrics)


@command(app, short_help="Detect objects in images: a COCO results JSON.")
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
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file and --draw drawings."),
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
    draw: Path | None = typer.Option(None, help="Also write each image with its boxes into this folder."),
    last: bool = LAST_OPTION,
) -> None:
    """Detect objects in images: COCO results JSON (image_id, category_id, bbox [x, y, w, h] in pixels, score,
    plus category_name and file_name) and a table on screen; --draw DIR writes each image with its boxes,
    class names, scores and a legend to DIR/<file name>. One image that fails costs that image only."""
    from rich.progress import track

    from sparse_detr.inference import PredictorSettings, expand_image_paths, predict_files

    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it or choose another --out")
    paths = expand_image_paths(images)
    on_image = None
    if draw is not None:
        from sparse_detr.viz.detections import drawing_writer

        on_image = drawing_writer(paths, draw, force)
    settings = PredictorSettings(checkpoint=checkpoint, last=last, onnx=onnx, runtime=runtime, device=device,
                                 image_size=image_size, keep_ratio=rho, amp=amp, compile=compile)  # fmt: skip
    predictions = predict_files(
        paths, settings, out, threshold, ann, lambda items: track(items, "detecting", console=console), on_image
    )
    results, failures = predictions.results, predictions.failures
    shown = 50
    columns = [Column("image", wrap=True), Column("class"),
               *(Column(name, numeric=True) for name in ("score", "x", "y", "w", "h"))]  # fmt: skip
    rows = [[Path(result["file_name"]).name, result["category_name"], f"{result['score']:.3f}",
             *(f"{value:.1f}" for value in result["bbox"])] for result in results[:shown]]  # fmt: skip
    print_table(f"detections scoring at least {threshold:g}", columns, rows)
    more = f" (the table shows the first {shown})" if len(results) > shown else ""
    done = len(paths) - len(failures)
    drawn = f" and {done} drawing(s) to {draw}" if draw is not None else ""
    console.print(f"wrote {len(results)} detection(s) of {done} image(s) to {out}{drawn}{more}", soft_wrap=True)
    if done and not results and threshold > 0:  # an empty list is a valid results file; say why it is empty
        lower = "0.05 (or 0: the 100 best per image)" if threshold > 0.05 else "0 (the 100 best per image)"
        console.print(
            f"no detection scored at least {threshold:g}: an under-trained model scores lower; try --threshold {lower}",
            soft_wrap=True,
        )
    for reason in failures.values():
        console.print(f"[red]{escape(reason)}[/red]", soft_wrap=True)
    if failures:
        raise InputError(f"{len(failures)} of {len(paths)} image(s) failed and are not in {out} (listed above)")
