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


@app.command()
def benchmark(
    op: bool = typer.Option(False, "--op", help="Time the deformable attention op backends."),
    backends: str = typer.Option(
        "pytorch,cpu,cuda", help="Comma-separated op backends to time (those unavailable are listed)."
    ),
    repeats: int = typer.Option(5, min=1, help="Timed repetitions per measurement (median reported)."),
    dtype: str = typer.Option("float32", help="float32, float64, float16 or bfloat16."),
    output: Path | None = typer.Option(None, help="Also write the table as CSV to this file."),
) -> None:
    """Benchmark the op (``--op``); model FLOPs/FPS benchmarks are not implemented yet."""
    if not op:
        _not_implemented("benchmark (model)")
    from sparse_detr.analysis.op_benchmark import run_op_benchmark

    frame = run_op_benchmark(
        backends=[b.strip() for b in backends.split(",") if b.strip()],
        repeats=repeats,
        dtype=dtype,
        log=console.print,
    )
    table = Table(title="ms_deform_attn: median milliseconds (ratio = pytorch time / this time)")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind == "f" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)
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
