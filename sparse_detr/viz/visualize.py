"""``sdetr visualize`` for one image file: forward passes at each keep ratio, the figure, its files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sparse_detr.errors import UsageError
from sparse_detr.inference import Detector
from sparse_detr.viz.figures import draw_explanation, save_explanation
from sparse_detr.viz.saliency import explain_image

FIGURE_SUFFIX = "_tokens"


def figure_stems(paths: Sequence[Path], out_dir: str | Path) -> list[Path]:
    """``out_dir/<image stem>_tokens`` per image (formats add the suffix).

    Raises:
        ValueError: when two images share a stem, which would write the same files.
    """
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise UsageError(f"{seen[path.stem]} and {path} would write the same figure: rename one of them")
        seen[path.stem] = path
    return [Path(out_dir) / f"{path.stem}{FIGURE_SUFFIX}" for path in paths]


def existing_outputs(stems: Sequence[Path], formats: Sequence[str]) -> list[Path]:
    """The figure files of ``stems`` that already exist."""
    return [
        stem.with_name(f"{stem.name}.{fmt}")
        for stem in stems
        for fmt in formats
        if stem.with_name(f"{stem.name}.{fmt}").exists()
    ]


def visualize_file(
    detector: Detector,
    path: str | Path,
    stem: str | Path,
    keep_ratios: Sequence[float | None] = (None,),
    threshold: float = 0.3,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Draw ``path`` with one row per keep ratio (None: the trained ρ) and write ``stem.<format>``.

    Raises:
        ImageLoadError: the image cannot be read. ValueError: the model has no scoring network, a ratio is
            outside (0, 1], or the image is too small for the model's queries.
    """
    image = detector.read_image(path)
    rows = [explain_image(detector, image, keep_ratio, threshold) for keep_ratio in keep_ratios]
    height, width = image.original_size
    title = (
        f"{Path(path).name} ({width}x{height}, model input {image.resized_size[1]}x{image.resized_size[0]}), "
        f"{detector.checkpoint}, {detector.device.type}, scores >= {threshold:g}"
    )
    figure = draw_explanation(image.pixels, rows, title)
    return save_explanation(figure, stem, formats)
