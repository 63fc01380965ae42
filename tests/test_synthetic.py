"""The built-in synthetic dataset: valid COCO, exact boxes, deterministic, quick to make."""

from __future__ import annotations

import contextlib
import io
import json
import time

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from sparse_detr.data import SHAPES, CocoDetection, make_synthetic_dataset, synthetic_splits
from sparse_detr.data.shapes import shape_mask
from sparse_detr.data.synthetic import render_scene


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "shapes", 24, 8, 64, seed=3)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_coco_fields(dataset_dir):
    train_images, train_ann, val_images, val_ann = synthetic_splits(dataset_dir)
    assert len(list(train_images.glob("*.png"))) == 24 and len(list(val_images.glob("*.png"))) == 8
    data = json.loads(train_ann.read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPES) + 1))
    images = {image["id"]: image for image in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert ann["iscrowd"] == 0
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h
    assert max(image["width"], image["height"]) == 64

    dataset = CocoDetection(train_images, train_ann)
    assert dataset.num_classes == len(SHAPES) + 1
    assert dataset.category_names[1] == "circle"
    image, target = dataset[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4


def test_deterministic(dataset_dir, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", 24, 8, 64, seed=3)
    assert _files(again) == _files(dataset_dir)
    other = make_synthetic_dataset(tmp_path / "other", 24, 8, 64, seed=4)
    assert _files(other)["annotations/instances_train.json"] != _files(dataset_dir)["annotations/instances_train.json"]


def test_reuse_replace_refuse(tmp_path):
    out = make_synthetic_dataset(tmp_path / "d", 2, 1, 48, seed=0)
    stamp = (out / "train" / "000000.png").stat().st_mtime_ns
    assert make_synthetic_dataset(out, 2, 1, 48, seed=0) == out
    assert (out / "train" / "000000.png").stat().st_mtime_ns == stamp  # reused as is
    make_synthetic_dataset(out, 3, 1, 48, seed=0)  # other arguments: replaced
    assert len(list((out / "train").glob("*.png"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_dataset(tmp_path / "mine", 2, 1, 48)
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "x", 0, 1, 48)


def test_boxes_are_exact_pixels():
    rng = np.random.default_rng(0)
    for kind in SHAPES:
        mask = shape_mask(kind, (64, 64), (32.0, 32.0), 20.0, rng)
        ys, xs = np.nonzero(mask)
        # every shape reaches close to its circumcircle and never beyond it
        assert 11 <= xs.min() and xs.max() <= 52 and 11 <= ys.min() and ys.max() <= 52, kind

    image, objects = render_scene(96, np.random.default_rng(5))
    pixels = np.asarray(image)
    for obj in objects:
        x, y, w, h = obj["bbox"]
        assert w > 0 and h > 0 and obj["area"] <= w * h
        assert 0 <= x and x + w <= pixels.shape[1] and 0 <= y and y + h <= pixels.shape[0]


def test_scenes_look_like_coco():
    """About a third of each image is covered by boxes; all categories appear; a few negatives."""
    coverage, counts, kinds = [], [], set()
    for index in range(60):
        image, objects = render_scene(96, np.random.default_rng([1, index]))
        union = np.zeros((image.height, image.width), dtype=bool)
        for obj in objects:
            x, y, w, h = obj["bbox"]
            union[y : y + h, x : x + w] = True
            kinds.add(obj["category_id"])
        coverage.append(union.mean())
        counts.append(len(objects))
    assert 0.2 < np.mean(coverage) < 0.45
    assert kinds == set(range(1, len(SHAPES) + 1))
    assert 1.5 < np.mean(counts) < 4.5


def test_ground_truth_scores_perfectly(dataset_dir):
    """The files work with pycocotools: the ground truth as detections gives AP 1."""
    _, _, val_images, val_ann = synthetic_splits(dataset_dir)
    coco = CocoDetection(val_images, val_ann).coco
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_generation_is_quick(tmp_path):
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "quick", 100, 20, 160, seed=0)
    assert time.perf_counter() - start < 10  # about 2 s on a laptop core
