"""``sdetr visualize``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from sparse_detr.cli._app import LAST_OPTION, app, command, console, parse_list
from sparse_detr.cli.evaluate import CHECKPOINT_HELP
from sparse_detr.errors import InputError


@command(app, short_help="Draw what the sparse encoder keeps, image by image.")
def visualize(
    images: list[str] = typer.Argument(..., help="Image files, folders or glob patterns (quote the globs)."),
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
    keep_ratios: list[str] | None = typer.Option(
        None,
        "--rho",
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
    last: bool = LAST_OPTION,
) -> None:
    """Draw what the sparse encoder keeps: for each image a figure with the detections, the scoring network's
    saliency per level, the selected tokens per level and combined, the decoder attention map (DAM) and the
    overlap of the selection with the DAM's top tokens; one row per --rho."""
    from rich.progress import track

    from sparse_detr.viz import visualize_files

    ratios = [value for text in keep_ratios or [] for value in parse_list(text, float, "--rho")] or [None]
    _, failures = visualize_files(
        images, checkpoint, out, ratios, threshold, parse_list(formats, str, "--format"), device, image_size,
        force, track=lambda items: track(items, description="drawing", console=console), last=last,
    )  # fmt: skip
    for reason in failures.values():
        console.print(f"[red]{escape(reason)}[/red]", soft_wrap=True)
    if failures:
        first = next(iter(failures))
        raise InputError(f"{len(failures)} image(s) could not be drawn (the first: {first})")
