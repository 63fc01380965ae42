"""Report tables: one pandas frame written as CSV (for tools) and Markdown (for people), atomically, so a
reader or a second process never sees a half-written report."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from sparse_detr.utils.io import atomic_write, atomic_write_text


def write_table(
    frame: pd.DataFrame,
    directory: str | Path,
    stem: str,
    title: str | None = None,
    notes: list[str] | None = None,
    float_format: str = ".3f",
    markdown: pd.DataFrame | None = None,
) -> tuple[Path, Path]:
    """Write ``directory/stem.csv`` and ``directory/stem.md`` (a ``# title``, the table, then ``notes``
    as bullet points); returns both paths. ``markdown``: a frame to show in the Markdown file instead of
    ``frame`` (the same rows, formatted for reading)."""
    directory = Path(directory)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    csv_path = atomic_write_text(directory / f"{stem}.csv", buffer.getvalue())
    parts = [f"# {title}\n"] if title else []
    parts.append((frame if markdown is None else markdown).to_markdown(index=False, floatfmt=float_format))
    if notes:
        parts.append("\n" + "\n".join(f"- {note}" for note in notes))
    md_path = atomic_write_text(directory / f"{stem}.md", "\n".join(parts) + "\n")
    return csv_path, md_path


def save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (the format follows the suffix: .png, .pdf, .svg)."""
    path = Path(path)
    return atomic_write(
        path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip("."), bbox_inches="tight")
    )
