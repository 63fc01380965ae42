"""``sdetr visualize``: for each image file, forward passes at each keep ratio, the figure, its files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sparse_detr.errors import InputError, UsageError
from sparse_detr.inference import Predictor, expand_image_paths, load_predictor
from sparse_detr.utils.io import check_writable
from sparse_detr.viz.figures import FIGURE_FORMATS, draw_explanation, save_explanation
from sparse_detr.viz.saliency import explain_image, require_saliency

logger = logging.getLogger(__name__)

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
    predictor: Predictor,
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
    image = predictor.read_image(path)
    rows = [explain_image(predictor, image, keep_ratio, threshold) for keep_ratio in keep_ratios]
    height, width = image.original_size
    title = (
        f"{Path(path).name} ({width}x{height}, model input {image.resized_size[1]}x{image.resized_size[0]}), "
        f"{predictor.checkpoint}, {predictor.device.type}, scores >= {threshold:g}"
    )
    figure = draw_explanation(image.pixels, rows, title)
    return save_explanation(figure, stem, formats)


def visualize_files(
    inputs: Sequence[str],
    checkpoint: str | Path | None,
    out: str | Path,
    keep_ratios: Sequence[float | None] = (None,),
    threshold: float = 0.3,
    formats: Sequence[str] = ("png",),
    device: str | None = None,
    image_size: int | None = None,
    force: bool = False,
    track: Callable[[Iterable], Iterable] = iter,
    last: bool = False,
) -> tuple[list[Path], dict[Path, str]]:
    """``sdetr visualize``: a figure per image file, folder entry or glob match of ``inputs`` (see
    :func:`visualize_file`) in ``out``, with the checkpoint's predictor (see
    :func:`~sparse_detr.inference.load_predictor`; ``last``: a run folder's last checkpoint, not its best).
    Everything is checked before the first figure: the
    formats, existing figures (refused without ``force``), the folder, a scoring network for every ratio.
    One image that fails costs that image only.

    Returns:
        the files written, and the images that failed with their reason.
    """
    if not formats or set(formats) - set(FIGURE_FORMATS):
        raise UsageError(f"--format takes a comma-separated subset of {','.join(FIGURE_FORMATS)}")
    paths = expand_image_paths(inputs)
    stems = figure_stems(paths, out)
    existing = existing_outputs(stems, formats)
    if existing and not force:
        raise UsageError(
            f"{existing[0]} exists ({len(existing)} figure file(s) would be overwritten): "
            "pass --force to overwrite or choose another --out"
        )
    check_writable(out)
    predictor = load_predictor(checkpoint, device, image_size, last=last)
    for keep_ratio in keep_ratios:
        require_saliency(predictor, keep_ratio)
    written, failures = [], {}
    for path, stem in track(list(zip(paths, stems))):
        try:
            files = visualize_file(predictor, path, stem, keep_ratios, threshold, formats)
        except InputError as error:  # an unreadable image, or one too small for the model
            failures[path] = str(error)
            logger.warning(f"failed: {error}")
            continue
        written += files
        logger.info(f"wrote {', '.join(map(str, files))}")
    return written, failures
