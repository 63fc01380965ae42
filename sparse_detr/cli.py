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


@app.command()
def train() -> None:
    """Train a model (not implemented yet)."""
    _not_implemented("train")


@app.command("eval")
def evaluate() -> None:
    """Evaluate a checkpoint with COCO AP (not implemented yet)."""
    _not_implemented("eval")


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
        columns = ["preset", "backbone", "keep_ratio", "kept_tokens", "tokens", "batch", "threads",
                   "median_s", "min_s", "max_s", "ratio_to_first", "peak_rss_mib"]
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
        detail = status.reason if not status.available else (
            f"build log: {status.build_log}" if status.build_log else "always available"
        )
        backends.add_row(status.name, "[green]yes[/green]" if status.available else "[red]no[/red]", detail)
    console.print(backends)


if __name__ == "__main__":
    app()
