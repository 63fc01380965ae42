"""``sdetr export``."""

from __future__ import annotations

from pathlib import Path

import typer

from sparse_detr.cli._app import LAST_OPTION, app, command, console, log_line
from sparse_detr.errors import UsageError


@command(app, short_help="Export a detector to one ONNX file.")
def export(
    checkpoint: str = typer.Option(..., help="Checkpoint file, run folder (its best checkpoint) or zoo name."),
    out: Path = typer.Option(Path("model.onnx"), help="ONNX file to write."),
    rho: float | None = typer.Option(None, help="Keep ratio the graph encodes with (default: the trained one)."),
    opset: int = typer.Option(18, help="ONNX opset (18 up to the newest one torch's exporter writes)."),
    postprocess: bool = typer.Option(
        False,
        "--postprocess",
        help="End the graph in the top-100 scores, labels and boxes in pixels (takes orig_sizes).",
    ),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with PyTorch after export."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file."),
    msda: str = typer.Option(
        "gridsample",
        help="Deformable attention as: gridsample (standard ONNX, any runtime), custom (one node onnxruntime runs "
        "with this project's kernel: fastest) or tensorrt (TensorRT's MultiscaleDeformableAttnPlugin_TRT node).",
    ),
    last: bool = LAST_OPTION,
) -> None:
    """Export a detector to one ONNX file with dynamic batch, height and width (needs onnx, onnxscript and
    onnxruntime: the package's "onnx" extra). `sdetr predict --onnx FILE` runs it with onnxruntime (or
    --runtime openvino, for a gridsample file); a custom file needs the custom-op library that sdetr builds
    and registers itself (`sdetr doctor` prints its path for plain onnxruntime); a tensorrt file goes to
    `trtexec --onnx=FILE`."""
    from sparse_detr.export import check_msda, check_opset, export_checkpoint, require_export_packages

    if out.exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it or choose another --out")
    require_export_packages(run=check)
    check_opset(opset)
    check_msda(msda)
    console.print(f"exporting {checkpoint} (tracing with torch.export; a minute for R50)", highlight=False)
    report = export_checkpoint(checkpoint, out, rho, opset, postprocess, check, msda=msda, last=last)
    if report.note:
        log_line(f"note: {report.note}")
    log_line(
        f"wrote {report.path} ({report.size_mib:.1f} MiB, opset {report.opset}, keep ratio {report.keep_ratio:g}, "
        f"deformable attention as {report.msda}{', post-processing' if report.postprocess else ''}) in "
        f"{report.seconds:.0f} s; onnx.checker passed"
    )
    if report.max_abs_diff is not None:
        differences = ", ".join(f"{name} {value:.1e}" for name, value in report.max_abs_diff.items())
        log_line(f"onnxruntime against PyTorch, largest absolute difference: {differences}")
