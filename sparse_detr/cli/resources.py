"""``sdetr data synth``, ``sdetr presets``, ``sdetr zoo`` and ``sdetr doctor``: the built-in dataset, the
presets, the released checkpoints and what this machine can run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from sparse_detr.cli._app import app, command, console, data_app, log_line, parse_list, print_table
from sparse_detr.cli._tables import Column


@command(data_app, "synth", short_help="Write the built-in synthetic detection dataset.")
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
    style: str = typer.Option("easy", help="easy (1-5 large objects) or hard (many small ones, distractors)."),
    foreground: float | None = typer.Option(
        None, help="With --style hard: the share of each image covered by boxes (default 0.15; COCO's ~0.3)."
    ),
) -> None:
    """Write the built-in synthetic detection dataset (train and val splits).

    Classes: circle, square, triangle, star, ring, cross (the default set) and hexagon, diamond, crescent,
    arrow; another class set (e.g. --classes triangle,star,hexagon,arrow --seed 1) makes a second dataset
    to fine-tune on.

    --style hard writes a dataset closer to COCO for token selection: 4 to 12 objects of widely varied,
    mostly small size covering --foreground of each image (default 0.15), over 2 to 6 unlabelled
    distractor shapes of the kinds that are not classes.

    A folder that already holds this dataset is left as is; one that holds another synthetic dataset is
    replaced only with --force; a folder that holds anything else is refused, --force or not.
    """
    from sparse_detr.data import make_synthetic_dataset
    from sparse_detr.data.synthetic import read_manifest

    before = read_manifest(out)
    root = make_synthetic_dataset(out, num_train, num_val, image_size, seed, parse_list(classes), force, style,
                                  foreground)  # fmt: skip
    if before is not None and before == read_manifest(root):
        console.print(f"{root} already holds this synthetic dataset: left as is")
    else:
        console.print(f"wrote the synthetic dataset to {root}")


@command(app, short_help="The model presets (for --preset).")
def presets() -> None:
    """The model presets (for --preset): each a model, its loss and its training recipe."""
    from sparse_detr.config import create_preset, list_presets, preset_description

    rows = []
    for name in list_presets():
        preset = create_preset(name)
        train = preset.train
        recipe = f"{train.epochs} ep, batch {train.batch_size}, {train.image_size} px"
        model = preset.config.model
        rows.append([name, preset_description(name), f"{model.keep_ratio:g}", model.backbone, recipe])
    columns = [Column("name"), Column("model", wrap=True), Column("ρ"), Column("backbone"), Column("recipe")]
    print_table("presets (sdetr train --preset NAME; --backbone swin-t for the Swin-T variants)", columns, rows)


@command(app, short_help="The released checkpoints (for --checkpoint, --init).")
def zoo() -> None:
    """The released checkpoints: names for --checkpoint (eval, predict, visualize, benchmark) and --init."""
    from sparse_detr.zoo import ZOO_NOTE, zoo_dir, zoo_table

    columns = [Column("name"), *(Column(header, numeric=True) for header in ("AP", "params", "GFLOPs", "FPS b4")),
               Column("cached")]  # fmt: skip
    rows = [[row.name, f"{row.AP:.1f}", f"{row.params_M:.1f}M", f"{row.GFLOPs:.1f}", f"{row.FPS_b4:.1f}",
             "yes" if row.cached else ""] for row in zoo_table().itertuples(index=False)]  # fmt: skip
    print_table("released Sparse DETR checkpoints (COCO 2017 val)", columns, rows)
    console.print(f"{ZOO_NOTE}.", highlight=False)  # prose: wrapped at words
    console.print(f"cache: {zoo_dir()} (SDETR_ZOO_DIR); links: SDETR_ZOO_URL or the authors' release",
                  highlight=False, soft_wrap=True)  # fmt: skip


@command(app, short_help="Versions, devices and the op backends that run here.")
def doctor() -> None:
    """Print versions, devices and which deformable-attention backends run here (and why not).

    A damaged kernel library in the cache is rebuilt, or its backend is reported unavailable, and the table
    says which.
    """
    from sparse_detr.doctor import backend_detail, backend_files, environment, op_backends

    table = Table(title="environment", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long value wraps rather than lose its end
    for key, value in environment().items():
        table.add_row(key, Text(value))
    console.print(table)
    with console.status("checking op backends (the first run compiles the kernels)..."):
        statuses = op_backends()
    rows = [[status.name, Text("yes", "green") if status.available else Text("no", "red"), backend_detail(status)]
            for status in statuses]  # fmt: skip
    columns = [Column("backend"), Column("available"), Column("detail", wrap=True)]
    print_table("deformable attention backends", columns, rows)
    for line in (line for status in statuses for line in backend_files(status)):
        log_line(line)
