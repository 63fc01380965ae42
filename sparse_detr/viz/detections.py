"""Detections drawn on their image with Pillow, for people to look at: each box in its class's colour with a
"name score" label on a filled background, and a legend of the classes present (colour, name, count) in the
bottom-left corner. A drawing keeps the image's size and displayed orientation (EXIF applied, as the boxes
are); ``sdetr predict --draw DIR`` writes one per input image."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
from PIL import ImageColor, ImageDraw, ImageFont

from sparse_detr.data import load_rgb_image
from sparse_detr.errors import UsageError
from sparse_detr.utils.io import atomic_write, check_writable

# matplotlib's tab10 indexed by category id, as the detections of `sdetr visualize`: a class keeps its colour
# from image to image (the labels name the classes where two share one)
PALETTE = tuple(
    ImageColor.getrgb(colour)
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
)  # fmt: skip
LEGEND_SHADE = 0.65  # how dark the legend's background is (0: clear, 1: black)
EMPTY_NOTE = "no detections"
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}  # the savers' defaults (75, 80) blur labels


def class_colour(category_id: int) -> tuple[int, int, int]:
    """The RGB colour a category's boxes are drawn in."""
    return PALETTE[category_id % len(PALETTE)]


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (by luma)."""
    red, green, blue = fill
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at a size readable at the image's scale (1/50 of its longer side, at least 10 px)."""
    return ImageFont.load_default(max(10, round(max(image_size) / 50)))


def _line_width(image_size: tuple[int, int]) -> int:
    """Box outline width in pixels: 1 up to 480-pixel images, growing with the longer side."""
    return max(1, round(max(image_size) / 320))


def _draw_box(draw: ImageDraw.ImageDraw, detection: dict[str, Any], font, line_width: int, image_width: int) -> None:
    """The outline of ``detection``'s box and its label, above the box (inside it at the image's top edge),
    kept within the image's width."""
    x, y, w, h = detection["bbox"]
    colour = class_colour(detection["category_id"])
    draw.rectangle((round(x), round(y), round(x + w), round(y + h)), outline=colour, width=line_width)
    text = f"{detection['category_name']} {detection['score']:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, line_width)
    label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
    label_x = min(max(0, round(x)), max(0, image_width - label_w))
    label_y = round(y) - label_h if round(y) >= label_h else max(0, round(y))
    draw.rectangle((label_x, label_y, label_x + label_w - 1, label_y + label_h - 1), fill=colour)
    draw.text((label_x + pad - left, label_y + pad - top), text, fill=_text_colour(colour), font=font)


def _legend_rows(detections: Sequence[dict[str, Any]], fit: int) -> list[tuple[tuple[int, int, int] | None, str]]:
    """(swatch colour or None, text) per legend row: the classes present, most boxes first, at most ``fit``
    rows (the last says how many classes are left out)."""
    counts = Counter((d["category_id"], d["category_name"]) for d in detections)
    rows = [
        (class_colour(category_id), f"{name}: {count}")
        for (category_id, name), count in sorted(counts.items(), key=lambda item: (-item[1], item[0][1]))
    ]
    if not rows:
        return [(None, EMPTY_NOTE)]
    if len(rows) > fit:
        rows = rows[: max(0, fit - 1)] + [(None, f"+{len(rows) - max(0, fit - 1)} more classes")]
    return rows


def _draw_legend(canvas: PIL.Image.Image, detections: Sequence[dict[str, Any]], font) -> None:
    """Shade the bottom-left corner and list the classes present on it, a swatch of each colour before its
    name and box count; an image without detections gets :data:`EMPTY_NOTE`."""
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    text_h = bottom - top
    pad, row_h = max(2, text_h // 3), text_h + max(2, text_h // 3)
    rows = _legend_rows(detections, fit=max(1, (canvas.height - 2 * pad) // row_h))
    swatch = text_h
    text_w = max(draw.textlength(text, font=font) for _, text in rows)
    box_w = min(canvas.width, round(2 * pad + swatch + pad + text_w))
    box_h = min(canvas.height, 2 * pad + row_h * len(rows) - (row_h - text_h))
    corner = (0, canvas.height - box_h, box_w, canvas.height)
    shaded = PIL.Image.blend(canvas.crop(corner), PIL.Image.new("RGB", (box_w, box_h)), LEGEND_SHADE)
    canvas.paste(shaded, corner[:2])
    for index, (colour, text) in enumerate(rows):
        row_y = corner[1] + pad + index * row_h
        if colour is not None:
            draw.rectangle((pad, row_y, pad + swatch - 1, row_y + swatch - 1), fill=colour)
        draw.text((2 * pad + swatch - left, row_y - top), text, fill=(255, 255, 255), font=font)


def draw_detections(image: str | Path | PIL.Image.Image, detections: Sequence[dict[str, Any]]) -> PIL.Image.Image:
    """``image`` with ``detections`` drawn on it: a new RGB image of the same size.

    Args:
        image: an image file (read as the predictor reads it: any mode, EXIF orientation applied) or a PIL
            image in the frame of the boxes.
        detections: COCO results in the image's pixels with ``category_name`` (what
            :class:`~sparse_detr.inference.Predictor` gives); the best are drawn last, on top.

    Raises:
        ImageLoadError: the file cannot be read (one line naming it).
    """
    canvas = load_rgb_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    font, line_width = _font(canvas.size), _line_width(canvas.size)
    draw = ImageDraw.Draw(canvas)
    for detection in sorted(detections, key=lambda d: d["score"]):
        _draw_box(draw, detection, font, line_width, canvas.width)
    _draw_legend(canvas, detections, font)
    return canvas


def drawing_format(path: str | Path) -> str | None:
    """The PIL format that writes files named like ``path`` (by suffix), None when PIL writes none."""
    name = PIL.Image.registered_extensions().get(Path(path).suffix.lower())
    return name if name in PIL.Image.SAVE else None


def save_drawing(drawing: PIL.Image.Image, path: str | Path) -> Path:
    """Write ``drawing`` to ``path`` atomically, in the format its suffix names.

    Raises:
        OutputError: the file cannot be written. UsageError: PIL writes no format of that suffix.
    """
    name = drawing_format(path)
    if name is None:
        raise UsageError(f"{path}: cannot write images of this suffix; name it .png or .jpg")
    return atomic_write(path, lambda tmp: drawing.save(tmp, format=name, **SAVE_OPTIONS.get(name, {})))


def drawing_files(paths: Sequence[Path], folder: str | Path, force: bool = False) -> dict[Path, Path]:
    """Where each image's drawing goes: ``folder/<its file name>`` (``<stem>.png`` when PIL cannot write its
    format). Checked before any work: ``folder`` is a writable folder that holds none of the images, and no two
    images or existing files (without ``force``) share a drawing.

    Raises:
        UsageError, OutputError: one line naming the folder or the images.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--draw {folder} is a file: give a folder for the drawings (created when missing)")
    if folder.resolve() in {path.parent.resolve() for path in paths}:
        raise UsageError(f"--draw {folder} holds the input images: give another folder, so that none is overwritten")
    files: dict[Path, Path] = {}
    drawn_from: dict[Path, Path] = {}
    for path in paths:
        file = folder / (path.name if drawing_format(path) else f"{path.stem}.png")
        if file in drawn_from:
            raise UsageError(f"{drawn_from[file]} and {path} would both be drawn to {file}: rename one of them")
        drawn_from[file] = path
        files[path] = file
    existing = [file for file in files.values() if file.exists()]
    if existing and not force:
        raise UsageError(
            f"{existing[0]} exists ({len(existing)} drawing(s) would be overwritten): "
            "pass --force to overwrite or choose another --draw folder"
        )
    check_writable(folder)
    return files


def drawing_writer(
    paths: Sequence[Path], folder: str | Path, force: bool = False
) -> Callable[[Path, Sequence[dict[str, Any]]], Path]:
    """What ``sdetr predict --draw folder`` calls as each image finishes: draw its detections and write
    them to its file in ``folder`` (see :func:`drawing_files`, which checks the folder now)."""
    files = drawing_files(paths, folder, force)
    return lambda path, detections: save_drawing(draw_detections(path, detections), files[path])
