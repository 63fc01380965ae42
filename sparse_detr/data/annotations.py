"""Reading and checking COCO instances files, and the category id <-> label rule."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

_REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


class AnnotationFileError(ValueError):
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


def _check_ids_unique(path: Path, section: str, entries: list[dict]) -> None:
    seen: set = set()
    for entry in entries:
        if entry["id"] in seen:
            raise AnnotationFileError(f"{path}: '{section}' id {entry['id']!r} appears more than once")
        seen.add(entry["id"])


def _check_boxes(path: Path, annotations: list[dict]) -> None:
    for i, ann in enumerate(annotations):
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise AnnotationFileError(f"{path}: annotation #{i} has bbox {box!r}; expected [x, y, width, height]")


def load_coco_annotations(path: str | Path) -> COCO:
    """Parse and check a COCO instances file; returns the pycocotools index.

    Missing ``area`` is filled with the box area and missing annotation ``id`` with a running number
    (COCOeval needs both). Annotations of image ids that ``images`` does not list are dropped with a
    warning. Anything else wrong raises :class:`AnnotationFileError` (or ``FileNotFoundError``) naming
    the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
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
    _check_ids_unique(path, "images", data["images"])
    _check_ids_unique(path, "categories", data["categories"])
    _check_boxes(path, data["annotations"])

    category_ids = {c["id"] for c in data["categories"]}
    unknown = sorted({a["category_id"] for a in data["annotations"]} - category_ids, key=repr)
    if unknown:
        raise AnnotationFileError(f"{path}: annotations use category ids {unknown[:5]} not listed in 'categories'")

    image_ids = {image["id"] for image in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        warnings.warn(
            f"{path}: {len(orphans)} annotations refer to image ids not listed in 'images' "
            f"(e.g. {orphans[0]['image_id']!r}); they are ignored",
            stacklevel=2,
        )
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]

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
