"""The visualizer's figure: for one image, one row per keep ratio ρ with the detections, the scoring
network's saliency per level, the selected tokens per level and combined, the decoder attention map (DAM)
per level and the overlap of the selection with the DAM's own top tokens.

Drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot state), saved atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Patch, Rectangle

from sparse_detr.utils.report import save_figure
from sparse_detr.viz.saliency import TokenView

FIGURE_FORMATS = ("png", "pdf", "svg")
DISPLAY_MAX_SIDE = 640  # maps are drawn at most this large; a bigger photo gains nothing at figure size
PANEL_TITLES = (
    "detections",
    "saliency (scoring network)",
    "selected tokens",
    "selected, all levels",
    "decoder attention map (DAM)",
    "selected vs DAM top-ρ (DAM mass kept)",
)
CELL_WIDTHS = (1.0, 1.15, 1.0, 1.15, 1.15, 1.0)  # cells with a colour bar are wider
CELL_INCHES = 2.6
DIM = 0.65  # opacity of the shade over tokens a mask leaves out
# overlap classes: neither, selected only, DAM top-ρ only, both
OVERLAP_COLORS = ((0, 0, 0, DIM), (0.12, 0.47, 0.71, 0.55), (0.84, 0.15, 0.16, 0.6), (0.17, 0.63, 0.17, 0.45))
OVERLAP_LABELS = ("selected only", "DAM top-ρ only", "both")


def display_size(original_size: tuple[int, int], max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(height, width) the image is drawn at: its own, scaled down to ``max_side`` on the longer side."""
    height, width = original_size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def row_title(view: TokenView) -> str:
    """ρ, kept tokens per level, inference time and DAM agreement of one row."""
    kept = "/".join(map(str, view.kept_per_level))
    total = "/".join(map(str, view.tokens_per_level))
    return (
        f"ρ = {view.keep_ratio:g}: kept tokens per level {kept} of {total} ({sum(view.kept_per_level)} in all), "
        f"inference {view.seconds * 1000:.0f} ms; DAM mass on kept tokens {view.coverage:.0%}, "
        f"DAM top-ρ tokens kept {view.overlap:.0%}"
    )


def _level_axes(cell: SubFigure, levels: int) -> list:
    cols = math.ceil(math.sqrt(levels))
    axes = list(np.ravel(cell.subplots(math.ceil(levels / cols), cols, squeeze=False)))
    for ax in axes:
        ax.set_axis_off()
    return axes[:levels]


def _show(ax, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def _shade(mask: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4): dark where ``mask`` is False, clear where True."""
    rgba = np.zeros((*mask.shape, 4))
    rgba[..., 3] = np.where(mask, 0.0, DIM)
    return rgba


def _colorbar(cell, mappable, axes, label: str):
    colorbar = cell.colorbar(mappable, ax=axes, shrink=0.8)
    colorbar.ax.tick_params(labelsize=6)
    colorbar.set_label(label, fontsize=7)
    return colorbar


def _draw_detections(ax, picture: np.ndarray, detections: list[dict], original_size: tuple[int, int]) -> None:
    _show(ax, picture, f"{len(detections)} detection(s)")
    scale_y, scale_x = picture.shape[0] / original_size[0], picture.shape[1] / original_size[1]
    palette = colormaps["tab10"]
    for detection in detections:
        x, y, w, h = detection["bbox"]
        color = palette(detection["category_id"] % 10)
        ax.add_patch(
            Rectangle((x * scale_x, y * scale_y), w * scale_x, h * scale_y, fill=False, edgecolor=color, lw=1.5)
        )
        ax.text(
            x * scale_x, y * scale_y, f"{detection['category_name']} {detection['score']:.2f}", fontsize=6,
            color="white", va="bottom", bbox={"facecolor": color, "edgecolor": "none", "pad": 1, "alpha": 0.8},
        )  # fmt: skip


def _draw_maps(cell, picture, maps, view: TokenView, norm: Normalize, cmap: str, label: str) -> None:
    axes = _level_axes(cell, len(maps))
    for level, (ax, values) in enumerate(zip(axes, maps)):
        _show(ax, picture, f"level {level} (stride {view.strides[level]})")
        image = ax.imshow(values, cmap=cmap, norm=norm, alpha=0.6)
    _colorbar(cell, image, axes, label)


def _draw_selected(cell, picture, masks, view: TokenView) -> None:
    for level, (ax, mask) in enumerate(zip(_level_axes(cell, len(masks)), masks)):
        _show(ax, picture, f"level {level}: {view.kept_per_level[level]} of {view.tokens_per_level[level]}")
        ax.imshow(_shade(mask))


def _draw_combined(cell, picture, masks) -> None:
    ax = cell.subplots()
    _show(ax, picture, "pixels under a kept token")
    levels = np.sum(masks, axis=0)
    ax.imshow(_shade(levels > 0))
    image = ax.imshow(np.ma.masked_equal(levels, 0), cmap="viridis", vmin=0.5, vmax=len(masks) + 0.5, alpha=0.5)
    _colorbar(cell, image, ax, "levels keeping it").set_ticks(range(1, len(masks) + 1))


def _draw_overlap(cell, picture, selected, dam_top, view: TokenView) -> None:
    palette = np.array(OVERLAP_COLORS)
    for level, (ax, kept, top) in enumerate(zip(_level_axes(cell, len(selected)), selected, dam_top)):
        _show(ax, picture, f"level {level}: {view.coverage_per_level[level]:.0%}")
        ax.imshow(palette[kept.astype(int) + 2 * top.astype(int)])
    handles = [Patch(color=color[:3], label=label) for color, label in zip(OVERLAP_COLORS[1:], OVERLAP_LABELS)]
    cell.legend(handles=handles, loc="lower center", ncol=3, fontsize=6, frameon=False)


def draw_explanation(image: PIL.Image.Image, rows: Sequence[tuple[TokenView, list[dict]]], title: str = "") -> Figure:
    """The figure of one image: a row per (view, detections) pair, with the panels of ``PANEL_TITLES``.

    Saliency shares one colour scale over all levels and rows, the DAM one scale over the levels of a row.
    """
    if not rows:
        raise ValueError("draw_explanation needs at least one (view, detections) row")
    original_size = rows[0][0].original_size
    size = display_size(original_size)
    picture = np.asarray(image.convert("RGB").resize((size[1], size[0]), PIL.Image.BILINEAR))
    saliency_values = np.concatenate([level.ravel() for view, _ in rows for level in view.saliency])
    saliency_norm = Normalize(float(saliency_values.min()), float(saliency_values.max()))

    aspect = min(max(size[0] / size[1], 0.5), 1.6)
    row_inches = CELL_INCHES * aspect + 0.8
    figure = Figure(figsize=(CELL_INCHES * sum(CELL_WIDTHS), row_inches * len(rows) + 0.4), layout="constrained")
    if title:
        figure.suptitle(title, fontsize=10)
    for row, (view, detections) in zip(figure.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
        row.suptitle(row_title(view), fontsize=8)
        cells = row.subfigures(1, len(PANEL_TITLES), width_ratios=CELL_WIDTHS)
        for cell, panel in zip(cells, PANEL_TITLES):
            cell.suptitle(panel, fontsize=8)
        selected = view.on_image(view.selected, size)
        _draw_detections(cells[0].subplots(), picture, detections, original_size)
        _draw_maps(cells[1], picture, view.on_image(view.saliency, size), view, saliency_norm, "magma", "logit")
        _draw_selected(cells[2], picture, selected, view)
        _draw_combined(cells[3], picture, selected)
        dam = view.on_image(view.dam, size)
        dam_norm = Normalize(0.0, max(float(np.max(level)) for level in dam) or 1.0)
        _draw_maps(cells[4], picture, dam, view, dam_norm, "inferno", "attention mass")
        _draw_overlap(cells[5], picture, selected, view.on_image(view.dam_top, size), view)
    return figure


def save_explanation(figure: Figure, stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``figure`` as ``stem.<format>`` for each format (atomically); returns the paths."""
    unknown = sorted(set(formats) - set(FIGURE_FORMATS))
    if unknown:
        raise ValueError(f"unknown figure format(s) {unknown}; choose from {', '.join(FIGURE_FORMATS)}")
    stem = Path(stem)
    return [save_figure(figure, stem.with_name(f"{stem.name}.{fmt}")) for fmt in formats]
