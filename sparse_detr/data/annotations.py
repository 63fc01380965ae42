"""Reading and checking COCO instances files, and the category id <-> label rule."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from sparse_detr.errors import InputError, MissingFileError

_REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


BAD_BOX_RULES = ("error", "drop", "keep")


class AnnotationFileError(InputError):
    """An annotations file that is not a usable COCO instances file."""


def _check_entries(path: Path, section: str, entries: list[Any]) -> None:
    keys = _REQUIRED[section]
    bad = [i for i, entry in enumerate(entries) if not isinstance(entry, dict) or any(k not in entry for k in keys)]
    if bad:
        first = entries[bad[0]]
        missing = [k for k in keys if not isinstance(first, dict) or k not in first]
        raise AnnotationFileError(
            f"{path}: {len(bad)} '{section}' entries lack required keys (entry #{bad[0]} has no {missing}); "
            f"each needs {', '.join(keys)}"
        )


def _is_id(value: Any) -> bool:
    """COCO ids are integers (image ids become int64 tensors, results files use them as numbers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0


# section, key, whether the value is valid (a missing optional key is None), what it must be
_FIELD_TYPES = (
    ("images", "id", _is_id, "an integer id"),
    ("images", "file_name", lambda v: isinstance(v, str) and v, "a file name"),
    ("images", "width", lambda v: v is None or _is_positive(v), "a positive width in pixels"),
    ("images", "height", lambda v: v is None or _is_positive(v), "a positive height in pixels"),
    ("categories", "id", _is_id, "an integer id"),
    ("categories", "name", lambda v: isinstance(v, str), "a string name"),
    ("annotations", "image_id", _is_id, "an integer image_id"),
    ("annotations", "category_id", _is_id, "an integer category_id"),
    ("annotations", "id", lambda v: v is None or _is_id(v), "an integer id"),
    ("annotations", "iscrowd", lambda v: v is None or v in (0, 1), "iscrowd 0 or 1"),
    ("annotations", "area", lambda v: v is None or (_is_number(v) and math.isfinite(v) and v >= 0),
     "an area that is a finite number >= 0"),
)  # fmt: skip


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """Ids are integers, names and file names strings, image sizes positive numbers, areas numbers >= 0 and
    iscrowd 0 or 1: anything else is one error naming the section, the entry and the field."""
    for section, key, valid, expected in _FIELD_TYPES:
        for index, entry in enumerate(data[section]):
            if not valid(entry.get(key)):
                name = f"entry #{index}" + (f" (id {entry['id']})" if key != "id" and _is_id(entry.get("id")) else "")
                raise AnnotationFileError(
                    f"{path}: '{section}' {name} has {key} {entry.get(key)!r}; each needs {expected}"
                )


def _check_ids_unique(path: Path, section: str, entries: list[dict]) -> None:
    seen: set = set()
    for entry in entries:
        if entry["id"] in seen:
            raise AnnotationFileError(f"{path}: '{section}' id {entry['id']!r} appears more than once")
        seen.add(entry["id"])


NOT_A_BOX = "that is not [x, y, width, height]"


def _box_problem(box: Any) -> str | None:
    """Why ``box`` is no usable ``[x, y, width, height]`` (None if it is one)."""
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return NOT_A_BOX
    if not all(math.isfinite(v) for v in box):
        return "with non-finite values"
    if box[2] <= 0 or box[3] <= 0:
        return "with a width or height that is not positive"
    return None


def _checked_boxes(path: Path, annotations: list[dict], bad_boxes: str) -> tuple[list[dict], Counter]:
    """The annotations to keep, and the count of the dropped ones by reason (with a first example).

    With ``bad_boxes="error"`` any bad box is an error; with ``"drop"`` it is dropped; with ``"keep"`` a box
    with non-finite numbers or a width or height that is not positive is kept, and one that is no list of
    four numbers dropped (it is no box to keep).
    """
    kept, dropped, examples = [], Counter(), {}
    for index, annotation in enumerate(annotations):
        problem = _box_problem(annotation["bbox"])
        name = f"id {annotation['id']!r}" if "id" in annotation else f"#{index}"
        if problem and bad_boxes == "error":
            count = sum(_box_problem(other["bbox"]) is not None for other in annotations)
            raise AnnotationFileError(
                f"{path}: annotation {name} has a bbox {annotation['bbox']!r} {problem} ({count} bad box(es) in the "
                "file); boxes must be [x, y, width, height] with finite numbers and a positive width and "
                "height: fix or remove them, or AP on this file would be wrong"
            )
        if problem and (bad_boxes == "drop" or problem == NOT_A_BOX):
            examples.setdefault(problem, name)
            dropped[problem] += 1
            continue
        kept.append(annotation)
    return kept, Counter({f"{problem} (e.g. annotation {examples[problem]})": n for problem, n in dropped.items()})


def load_coco_annotations(path: str | Path, bad_boxes: str = "error") -> COCO:
    """Parse and check a COCO instances file; returns the pycocotools index.

    Checked: the required keys, the types of ids, names, image sizes, areas and iscrowd, unique ids, known
    category ids, and boxes: four finite numbers with positive width and height. ``bad_boxes`` says what a
    box that fails the last check does: ``"error"`` (evaluation data, where it would make AP wrong),
    ``"drop"`` (training data: dropped, counted in one warning) or ``"keep"`` (files read only for their
    images: only boxes that are no four numbers are dropped). Annotations of image ids that
    ``images`` does not list are dropped with the same warning. Missing ``area`` is filled with the box
    area and missing annotation ``id`` with a running number (COCOeval needs both). Anything else wrong
    raises :class:`AnnotationFileError` (or :class:`~sparse_detr.errors.MissingFileError`) naming the file.
    """
    if bad_boxes not in BAD_BOX_RULES:
        raise ValueError(f"bad_boxes must be one of {BAD_BOX_RULES}, got {bad_boxes!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"annotations file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationFileError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise AnnotationFileError(f"{path}: expected a JSON object with images, annotations and categories")
    for section in _REQUIRED:
        if not isinstance(data.get(section), list):
            problem = "missing" if section not in data else "not a list"
            raise AnnotationFileError(
                f"{path}: not a COCO instances file: key '{section}' is {problem} "
                f"(needs lists 'images', 'annotations', 'categories')"
            )
        _check_entries(path, section, data[section])
    if not data["categories"]:
        raise AnnotationFileError(f"{path}: 'categories' is empty")
    _check_types(path, data)
    _check_ids_unique(path, "images", data["images"])
    _check_ids_unique(path, "categories", data["categories"])

    category_ids = {c["id"] for c in data["categories"]}
    unknown = sorted({a["category_id"] for a in data["annotations"]} - category_ids, key=repr)
    if unknown:
        raise AnnotationFileError(f"{path}: annotations use category ids {unknown[:5]} not listed in 'categories'")

    total = len(data["annotations"])
    data["annotations"], dropped = _checked_boxes(path, data["annotations"], bad_boxes)
    image_ids = {image["id"] for image in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        dropped[f"of image ids not in 'images' (e.g. {orphans[0]['image_id']!r})"] = len(orphans)
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    if dropped:
        reasons = "; ".join(f"{count} {reason}" for reason, count in dropped.items())
        warnings.warn(f"{path}: dropped {sum(dropped.values())} of {total} annotations: {reasons}", stacklevel=2)

    used_ids = {a["id"] for a in data["annotations"] if "id" in a}
    next_id = max((i for i in used_ids if isinstance(i, int)), default=0) + 1
    for ann in data["annotations"]:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
    _check_ids_unique(path, "annotations", data["annotations"])

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def category_label_map(category_ids: Iterable[int]) -> dict[int, int]:
    """Category id -> class label the model predicts.

    The rule: ids are used as labels unchanged when they are non-negative integers and the largest is
    below twice the number of categories -- COCO (80 categories, ids 1..90 -> 91 classes, the slots the
    released checkpoints use), or any 0- or 1-based numbering with a few gaps. Otherwise (large or
    sparse ids, negative or non-integer ids) they are numbered 0..K-1 in ascending id order.
    """
    ids = sorted(set(category_ids), key=lambda i: (0, i) if isinstance(i, int) else (1, str(i)))
    if not ids:
        raise ValueError("no categories")
    integral = all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    if integral and ids[0] >= 0 and ids[-1] < 2 * len(ids):
        return {i: i for i in ids}
    return {category_id: label for label, category_id in enumerate(ids)}
