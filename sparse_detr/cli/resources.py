"""``sdetr data synth``, ``sdetr presets``, ``sdetr zoo`` and ``sdetr doctor``: the built-in dataset, the
presets, the released checkpoints and what this machine can run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sparse_detr.cli._app import app, command, console, data_app, parse_list


@command(data_app, "synth")
def data_synth(
    out: Path = typer.Option(..., help="Folder to write the dataset to (COCO format: PNG + instances JSON)."),
    num_train: int = typer.Option(500, min=1, help="Training images."),
    num_val: int = typer.Option(100, min=1, help="Validation images."),
    image_size: int = typer.Option(160, min=32, help="Side of the square images, in pixels."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same dataset."),
    classes: str | None = typer.Option(
        None, help="Comma-separated shape classes, in label order (default: the built-in six; see --help)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace a synthetic dataset of other arguments in --out (other files never)."
    ),
) -> None:
    """Write the built-in synthetic detection dataset (train and val splits).

    Classes: circle, square, triangle, star, ring, cross (the default set) and hexagon, diamond, crescent,
    arrow; another class set (e.g. --classes triangle,star,hexagon,arrow --seed 1) makes a second dataset
    to fine-tune on.

    A folder that already holds this dataset is left as is; one that holds another synthetic dataset is
    replaced only with --force; a folder that holds anything else is refused, --force or not.
    """
    from sparse_detr.data import make_synthetic_dataset
    from sparse_detr.data.synthetic import read_manifest

    before = read_manifest(out)
    root = make_synthetic_dataset(out, num_train, num_val, image_size, seed, classes=parse_list(classes), replace=force)
    if before is not None and before == read_manifest(root):
        console.print(f"{root} already holds this synthetic dataset: left as is")
    else:
        console.print(f"wrote the synthetic dataset to {root}")


@command(app)
def presets() -> None:
    """The model presets (for --preset): each a model, its loss and its training recipe."""
    from sparse_detr.config import create_preset, list_presets, preset_description

    table = Table(title="presets (sdetr train --preset NAME; --backbone swin-t for the Swin-T variants)")
    for column in ("name", "model", "ρ", "backbone", "recipe"):
        table.add_column(column, no_wrap=column != "model")
    for name in list_presets():
        preset = create_preset(name)
        train = preset.train
        recipe = f"{train.epochs} ep, batch {train.batch_size}, {train.image_size} px"
        model = preset.config.model
        table.add_row(name, preset_description(name), f"{model.keep_ratio:g}", model.backbone, recipe)
    console.print(table)


@command(app)
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


@command(app)
def doctor() -> None:
    """Print versions, devices and which deformable-attention backends run here (and why not).

    A damaged kernel library in the cache is rebuilt, or its backend is reported unavailable, and the table
    says which.
    """
    from rich.markup import escape

    from sparse_detr.doctor import backend_detail, environment, op_backends

    table = Table(title="environment", show_header=False)
    for key, value in environment().items():
        table.add_row(key, value)
    console.print(table)
    with console.status("checking op backends (the first run compiles the kernels)..."):
        statuses = op_backends()
    backends = Table(title="deformable attention backends")
    for column in ("backend", "available", "detail"):
        backends.add_column(column, overflow="fold")  # long paths wrap rather than lose their end
    for status in statuses:
        available = "[green]yes[/green]" if status.available else "[red]no[/red]"
        backends.add_row(status.name, available, escape(backend_detail(status)))
    console.print(backends)
