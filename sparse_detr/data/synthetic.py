"""The built-in dataset: rendered shapes on cluttered backgrounds, written in COCO format.

Shapes of varied size, colour, texture and rotation, overlapping a little, about a third of each image covered
by boxes as in COCO. The categories are the six ``SHAPES`` (ids 1..6) by default, or any ordered selection of
``SHAPE_KINDS`` (ids 1..K in that order), e.g. other classes for a fine-tuning experiment. Two styles
(:data:`STYLES`): ``easy``, the default (one to five large objects), and ``hard``, closer to COCO for token
selection: more and smaller objects of widely varied size, a smaller share of the image in boxes
(``foreground``, default :data:`HARD_FOREGROUND`), and unlabelled distractors (shapes of the kinds that are
not classes) under them, which a selection rule must learn to leave out. Boxes and areas are the exact visible
pixels of each drawn shape. Everything follows from the seed: the same arguments give the same files. Layout::

    out_dir/train/000000.png ...   out_dir/val/...
    out_dir/annotations/instances_train.json, instances_val.json
    out_dir/synthetic.json          # the arguments and classes; a matching folder is reused as is
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparse_detr.config import MAX_IMAGE_SIZE
from sparse_detr.data.shapes import SHAPE_KINDS, SHAPES, background, fill, random_color, shape_mask
from sparse_detr.errors import ConfigError, OutputError, SparseDetrError, UsageError
from sparse_detr.utils.cache import os_error_reason, unwritable_cache, user_cache_dir
from sparse_detr.utils.progress import track

logger = logging.getLogger(__name__)
GENERATOR_VERSION = 1
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 160
MAX_OBJECTS = 5
MIN_VISIBLE = 0.6  # an object keeps at least this share of its pixels when later ones overlap it
_SPLIT_CODES = {"train": 0, "val": 1}
HARD_FOREGROUND = 0.15  # the hard style's default share of an image covered by boxes


@dataclass(frozen=True)
class SceneStyle:
    """How :func:`render_scene` fills an image: the number of objects (inclusive range; ``empty_share`` of
    images have none), the share of the image their boxes cover (range), how unequal their sizes are
    (``weights``: each object's share of that area is drawn from this range, then normalized), the bounds of
    an object's side (fractions of the shorter side) and the number of unlabelled distractor shapes."""

    name: str
    objects: tuple[int, int]
    foreground: tuple[float, float]
    weights: tuple[float, float]
    side: tuple[float, float]
    distractors: tuple[int, int] = (0, 0)
    empty_share: float = 0.03


EASY = SceneStyle("easy", objects=(1, MAX_OBJECTS), foreground=(0.25, 0.55), weights=(0.3, 1.0), side=(0.14, 0.6))
STYLES = ("easy", "hard")


def scene_style(name: str = "easy", foreground: float | None = None) -> SceneStyle:
    """The style ``name`` (see :data:`STYLES`); ``foreground`` (hard only): the share of an image covered by
    boxes, about which each image's share varies by ±20 %.

    Raises:
        ConfigError: an unknown style, ``foreground`` outside (0, 0.5], or given for the easy style.
    """
    if name not in STYLES:
        raise ConfigError(f"unknown synthetic style {name!r}; styles: {', '.join(STYLES)}")
    if name == "easy":
        if foreground is not None:
            raise ConfigError("--foreground sets the hard style's share of the image in boxes: add --style hard")
        return EASY
    share = HARD_FOREGROUND if foreground is None else foreground
    if not 0 < share <= 0.5:
        raise ConfigError(f"--foreground is the share of an image covered by boxes, in (0, 0.5]; got {share}")
    return SceneStyle("hard", objects=(4, 12), foreground=(0.8 * share, 1.2 * share), weights=(0.05, 1.0),
                      side=(0.04, 0.4), distractors=(2, 6))  # fmt: skip


MANIFEST_NAME = "synthetic.json"  # marks a folder written by make_synthetic_dataset
DATA_VARIABLE = "SDETR_DATA_DIR"
# the paths make_synthetic_dataset writes, relative to its folder: all it may replace
_OWN_PATH = re.compile(
    r"synthetic\.json|train|val|annotations|(train|val)/\d{6}\.png|annotations/instances_(train|val)\.json"
)


def default_dataset_dir() -> Path:
    """Where ``sdetr train`` keeps the built-in dataset: ``$SDETR_DATA_DIR`` or the user cache."""
    if DATA_VARIABLE in os.environ:
        return Path(os.environ[DATA_VARIABLE])
    return user_cache_dir() / "synthetic-shapes"


def _place(
    kind: str, radius: float, canvas: tuple[int, int], owner: np.ndarray, areas: list[int], rng: np.random.Generator
) -> np.ndarray | None:
    """The mask of a ``kind`` shape at a random spot that hides at most 1 - MIN_VISIBLE of any earlier
    object (``owner`` holds each pixel's object index, -1 for background), or None after 30 tries."""
    height, width = canvas
    margin = 0.75 * radius  # shapes may be cut a little by the border, as in photos
    for _ in range(30):
        center = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
        mask = shape_mask(kind, canvas, center, radius, rng)
        if mask.sum() < 16:
            continue
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
        visible = np.bincount(owner[owner >= 0], minlength=len(areas)) - covered
        if all(v >= MIN_VISIBLE * a for v, a in zip(visible, areas)):
            return mask
    return None


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """``classes`` as a tuple (None: ``SHAPES``), after checking it names distinct ``SHAPE_KINDS``."""
    if classes is None:
        return SHAPES
    if isinstance(classes, str):
        raise ConfigError(f"classes must be a sequence of shape names, not the string {classes!r}")
    classes = tuple(classes)
    if not classes:
        raise ConfigError(f"classes must name at least one shape; shapes: {', '.join(SHAPE_KINDS)}")
    unknown = [name for name in classes if name not in SHAPE_KINDS]
    if unknown:
        raise ConfigError(f"unknown shape classes {unknown}; known shapes: {', '.join(SHAPE_KINDS)}")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise ConfigError(f"shape classes named more than once: {repeated}")
    return classes


def render_scene(
    image_size: int, rng: np.random.Generator, classes: Sequence[str] = SHAPES, style: SceneStyle = EASY
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image (longer side ``image_size``) and its objects as ``{"category_id", "bbox" xywh, "area"}``;
    each object is one of ``classes``, whose category id is its position in ``classes`` plus 1; ``style``
    says how many, how large, and what else is drawn (see :class:`SceneStyle`)."""
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    height, width = (image_size, short) if rng.uniform() < 0.5 else (short, image_size)
    canvas = (height, width)
    image = background(canvas, rng)
    if style.distractors[1] > 0:
        _draw_distractors(image, style, classes, rng)
    owner = np.full(canvas, -1, dtype=np.int64)
    kinds: list[int] = []
    areas: list[int] = []

    count = 0 if rng.uniform() < style.empty_share else int(rng.integers(style.objects[0], style.objects[1] + 1))
    coverage = rng.uniform(*style.foreground) * height * width  # summed box area aimed at
    weights = rng.uniform(*style.weights, count)
    sides = np.sqrt(coverage * weights / max(weights.sum(), 1e-9))
    sides = np.clip(sides, style.side[0] * min(canvas), style.side[1] * min(canvas))
    for side in sorted(sides, reverse=True):  # big ones first: small ones stay visible on top
        kind = int(rng.integers(len(classes)))
        mask = _place(classes[kind], side / 2, canvas, owner, areas, rng)
        if mask is None:
            continue
        local = image[mask].mean(0)
        color = random_color(rng, (0.45, 1.0), (0.4, 1.0))
        for _ in range(20):  # stand out from what lies under it
            if np.abs(color - local).sum() > 150:
                break
            color = random_color(rng, (0.45, 1.0), (0.4, 1.0))
        image[mask] = fill(canvas, color, rng)[mask]
        owner[mask] = len(kinds)
        kinds.append(kind)
        areas.append(int(mask.sum()))

    objects = []
    for index, kind in enumerate(kinds):
        ys, xs = np.nonzero(owner == index)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"category_id": kind + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs))})
    pixels = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return pixels, objects


def _draw_distractors(image: np.ndarray, style: SceneStyle, classes: Sequence[str], rng: np.random.Generator) -> None:
    """Unlabelled shapes on the background of ``image`` (H, W, 3), in place, sized as the style's objects: of
    the kinds that are not ``classes`` (of the classes' own kinds when every kind is a class, still never
    annotated). The objects are drawn after them, on top."""
    kinds = [kind for kind in SHAPE_KINDS if kind not in classes] or list(classes)
    canvas = image.shape[:2]
    for _ in range(int(rng.integers(style.distractors[0], style.distractors[1] + 1))):
        side = rng.uniform(*style.side) * min(canvas)
        center = (rng.uniform(0, canvas[1]), rng.uniform(0, canvas[0]))
        mask = shape_mask(kinds[int(rng.integers(len(kinds)))], canvas, center, side / 2, rng)
        image[mask] = fill(canvas, random_color(rng, (0.45, 1.0), (0.4, 1.0)), rng)[mask]


def _write_split(
    root: Path, split: str, count: int, image_size: int, seed: int, classes: tuple[str, ...], style: SceneStyle
) -> None:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for index in track(range(count), f"writing the {split} images", unit="images"):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        image, objects = render_scene(image_size, rng, classes, style)
        file_name = f"{index:06d}.png"
        image.save(root / split / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **obj})
    dataset = {
        "info": {"description": f"sparse_detr synthetic shapes, {split} split", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def read_manifest(path: str | Path) -> dict | None:
    """The arguments that wrote the synthetic dataset in ``path`` (its ``synthetic.json``), None if none."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _check_replaceable(out: Path, replace: bool) -> None:
    """Refuse to write over ``out`` unless it is absent, empty, or holds only a synthetic dataset's own files
    and ``replace`` is given: files of anyone else are never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder; choose another --out")
    contents = sorted(out.rglob("*"))
    foreign = [path for path in contents if not _OWN_PATH.fullmatch(path.relative_to(out).as_posix())]
    if foreign and read_manifest(out) is None:
        raise UsageError(f"{out} exists and is not a synthetic dataset folder ({foreign[0]}); choose another --out")
    if foreign:
        raise UsageError(
            f"{out} holds a synthetic dataset and {len(foreign)} other file(s) (e.g. {foreign[0]}), which are never "
            "deleted: move them out or choose another --out"
        )
    if contents and not replace:
        held = "another synthetic dataset" if read_manifest(out) is not None else "an incomplete synthetic dataset"
        raise UsageError(f"{out} holds {held}: pass --force to replace it, or choose another --out")


def make_synthetic_dataset(
    out_dir: str | Path | None = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    replace: bool = True,
    style: str = "easy",
    foreground: float | None = None,
) -> Path:
    """Write the dataset to ``out_dir`` (default :func:`default_dataset_dir`) and return it.

    ``classes`` picks the categories, an ordered selection of distinct ``SHAPE_KINDS`` (ids 1..K in
    that order); unknown or repeated names raise ValueError. The default, ``SHAPES``, writes the same
    images and annotations as before the option existed. ``style`` and ``foreground``: see
    :func:`scene_style` (the easy default writes what it always wrote).

    A folder already holding this exact dataset is returned untouched; one holding only another synthetic
    dataset's files (``synthetic.json``, ``train/``, ``val/``, ``annotations/`` as written here) is replaced
    when ``replace``; a folder holding any other file is refused, ``replace`` or not, so that nothing of the
    user's is deleted. The files are written to a temporary folder and renamed into place, so concurrent
    callers (one per process) never see half a dataset.

    Raises:
        ConfigError: an argument out of range. UsageError: a folder that may not be replaced (see above).
        OutputError: the folder cannot be written (for the default folder, naming ``$SDETR_DATA_DIR``).
    """
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"need at least one train and one val image, got {num_train} and {num_val}")
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be from 32 to {MAX_IMAGE_SIZE} pixels, got {image_size}")
    classes = check_classes(classes)
    scene = scene_style(style, foreground)
    out = Path(out_dir) if out_dir is not None else default_dataset_dir()
    wanted = {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "classes": list(classes),
    }
    if scene != EASY:  # the easy style's folders keep the manifest they always had
        wanted.update(style=scene.name, foreground=HARD_FOREGROUND if foreground is None else foreground)
    if read_manifest(out) == wanted:
        return out
    _check_replaceable(out, replace)
    logger.info(f"writing the synthetic dataset ({num_train} + {num_val} images) to {out}, once…")
    try:
        _write_dataset(out, wanted, classes, scene)
    except OSError as error:
        if isinstance(error, SparseDetrError):
            raise
        if out_dir is None:
            raise unwritable_cache(out, DATA_VARIABLE, error) from None
        raise OutputError(
            f"cannot write the dataset to {out} ({os_error_reason(error)}); choose another --out"
        ) from None
    return out


def _write_dataset(out: Path, wanted: dict[str, Any], classes: tuple[str, ...], style: SceneStyle) -> None:
    """Write the dataset of the arguments ``wanted`` to a temporary folder beside ``out``, then rename it to
    ``out`` (replacing what :func:`_check_replaceable` allows; another process may have finished first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_split(tmp, "train", wanted["num_train"], wanted["image_size"], wanted["seed"], classes, style)
        _write_split(tmp, "val", wanted["num_val"], wanted["image_size"], wanted["seed"], classes, style)
        (tmp / MANIFEST_NAME).write_text(json.dumps(wanted, indent=2))
        if out.exists():
            if read_manifest(out) == wanted:  # another process finished first
                return
            _check_replaceable(out, replace=True)  # nothing foreign came in meanwhile
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if read_manifest(out) != wanted:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synthetic_splits(root: str | Path) -> tuple[Path, Path, Path, Path]:
    """``(train_images, train_ann, val_images, val_ann)`` of a folder written by :func:`make_synthetic_dataset`."""
    root = Path(root)
    annotations = root / "annotations"
    return root / "train", annotations / "instances_train.json", root / "val", annotations / "instances_val.json"
