"""The built-in synthetic dataset: valid COCO, exact boxes, deterministic, quick to make."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools.cocoeval import COCOeval

from sparse_detr.data import SHAPE_KINDS, SHAPES, CocoDetection, make_synthetic_dataset, synthetic_splits
from sparse_detr.data import synthetic as synthetic_module
from sparse_detr.data.shapes import shape_mask
from sparse_detr.data.synthetic import render_scene
from sparse_detr.errors import UsageError

NEW_KINDS = SHAPE_KINDS[len(SHAPES) :]

# sha256 of make_synthetic_dataset(out, 3, 2, 48, seed=0), recorded with the generator as it was before
# class selection and the extra shape kinds were added: the default dataset must not change. Annotation
# files are hashed as bytes; images as decoded pixels (the PNG bytes also depend on the zlib build).
DEFAULT_DATASET_SHA256 = {
    "annotations/instances_train.json": "57c381cc0eedd4b0157a16bde01570ebc6446382d5682d83db962275315cd570",
    "annotations/instances_val.json": "5c127b4cab708345ed7350611a65bcc6c39248b8f7eb26eafa3e4818eea0057c",
    "train/000000.png": "d3ed5aa0d93b2c34fa4d08521b509b6e54f9f0705aa59a915f354c5322961376",
    "train/000001.png": "2385418a935f0365f82cb2d3ff753a75a91fb5170056cd13b5f0a144bfab5d47",
    "train/000002.png": "e65eebd5eecac47be36fcd1281869385bcdb4c42e5885cc2adc32abecbc79092",
    "val/000000.png": "152ce5fa2de0c3b9d26fbfb52f7cda334332c6b2e2179b98f5f61bbae9caeb9c",
    "val/000001.png": "805458d50289630b37ed296ecfe4f278d13dc088baab25381941ea003e124938",
}


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
    with pytest.raises(UsageError, match="not a synthetic dataset"):
        make_synthetic_dataset(tmp_path / "mine", 2, 1, 48)
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "x", 0, 1, 48)


def test_default_dataset_is_unchanged(tmp_path):
    out = make_synthetic_dataset(tmp_path / "default", 3, 2, 48, seed=0)
    digests = {}
    for path in sorted(out.rglob("*")):
        if path.suffix == ".png":
            digests[str(path.relative_to(out))] = hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
        elif path.parent.name == "annotations":
            digests[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digests == DEFAULT_DATASET_SHA256
    named = make_synthetic_dataset(tmp_path / "named", 3, 2, 48, seed=0, classes=SHAPES)
    assert _files(named) == _files(out)  # naming the default classes is the default


def test_class_selection(tmp_path):
    classes = ("hexagon", "circle", "arrow", "crescent", "diamond")
    out = make_synthetic_dataset(tmp_path / "picked", 16, 4, 64, seed=1, classes=classes)
    assert json.loads((out / "synthetic.json").read_text())["classes"] == list(classes)
    _, train_ann, _, val_ann = synthetic_splits(out)
    for ann_file in (train_ann, val_ann):
        data = json.loads(ann_file.read_text())
        assert data["categories"] == [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)
        ]
        assert {a["category_id"] for a in data["annotations"]} <= set(range(1, len(classes) + 1))
    train = json.loads(train_ann.read_text())
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, len(classes) + 1))
    dataset = CocoDetection(*synthetic_splits(out)[:2])
    assert dataset.num_classes == len(classes) + 1 and dataset.category_names[1] == "hexagon"

    # same arguments, other classes: the folder is regenerated, not reused
    make_synthetic_dataset(out, 16, 4, 64, seed=1, classes=("arrow", "star"))
    data = json.loads(train_ann.read_text())
    assert [c["name"] for c in data["categories"]] == ["arrow", "star"]
    assert {a["category_id"] for a in data["annotations"]} == {1, 2}


def test_class_selection_is_deterministic(tmp_path):
    def make(name, seed, classes=NEW_KINDS):
        return _files(make_synthetic_dataset(tmp_path / name, 6, 2, 48, seed=seed, classes=classes))

    first = make("a", 5)
    assert make("b", 5) == first
    assert make("c", 6)["train/000000.png"] != first["train/000000.png"]
    assert (
        make("d", 5, NEW_KINDS[::-1])["annotations/instances_train.json"] != first["annotations/instances_train.json"]
    )


def test_bad_classes(tmp_path):
    with pytest.raises(ValueError, match="unknown shape classes \\['hexagonal'\\]; known shapes: circle, .*arrow"):
        make_synthetic_dataset(tmp_path / "x", 2, 1, 48, classes=("circle", "hexagonal"))
    with pytest.raises(ValueError, match="more than once: \\['ring'\\]"):
        make_synthetic_dataset(tmp_path / "x", 2, 1, 48, classes=("ring", "star", "ring"))
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "x", 2, 1, 48, classes=())
    with pytest.raises(ValueError, match="not the string"):
        make_synthetic_dataset(tmp_path / "x", 2, 1, 48, classes="hexagon")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        shape_mask("blob", (32, 32), (16.0, 16.0), 10.0, np.random.default_rng(0))


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kinds_have_exact_boxes(kind, monkeypatch):
    """Each new kind draws a non-empty mask, and its annotation is exactly the visible pixels: on a
    black background with each object filled by its own grey level, every object's pixels span its
    bbox and count its area."""
    mask = shape_mask(kind, (64, 64), (32.0, 32.0), 20.0, np.random.default_rng(0))
    assert mask.sum() > 100

    levels = iter(range(40, 256, 40))
    monkeypatch.setattr(synthetic_module, "background", lambda canvas, rng: np.zeros((*canvas, 3)))
    monkeypatch.setattr(synthetic_module, "fill", lambda canvas, color, rng: np.full((*canvas, 3), float(next(levels))))
    image, objects = render_scene(96, np.random.default_rng(2), (kind,))
    assert objects and {obj["category_id"] for obj in objects} == {1}
    pixels = np.asarray(image)[..., 0]
    for level, obj in zip(range(40, 256, 40), objects):
        ys, xs = np.nonzero(pixels == level)
        assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert obj["area"] == len(xs)


def test_boxes_are_exact_pixels():
    rng = np.random.default_rng(0)
    assert SHAPE_KINDS[: len(SHAPES)] == SHAPES
    for kind in SHAPE_KINDS:
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


def _box_statistics(root):
    """Objects per image, the mean share of an image covered by boxes, and the median box side."""
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    pixels = {image["id"]: image["width"] * image["height"] for image in data["images"]}
    covered = dict.fromkeys(pixels, 0.0)
    for ann in data["annotations"]:
        covered[ann["image_id"]] += ann["bbox"][2] * ann["bbox"][3] / pixels[ann["image_id"]]
    sides = [(ann["bbox"][2] * ann["bbox"][3]) ** 0.5 for ann in data["annotations"]]
    return len(data["annotations"]) / len(pixels), float(np.mean(list(covered.values()))), float(np.median(sides))


def test_the_hard_style_has_more_smaller_objects_and_its_foreground_share(tmp_path):
    easy = _box_statistics(make_synthetic_dataset(tmp_path / "easy", 40, 2, 160, seed=5))
    hard = _box_statistics(make_synthetic_dataset(tmp_path / "hard", 40, 2, 160, seed=5, style="hard"))
    sparse = _box_statistics(
        make_synthetic_dataset(tmp_path / "f08", 40, 2, 160, seed=5, style="hard", foreground=0.08)
    )
    assert hard[0] > 2 * easy[0] and hard[2] < 0.6 * easy[2]  # more objects, and smaller
    assert 0.1 < hard[1] < 0.2 and 0.05 < sparse[1] < 0.11 and easy[1] > 0.25  # the share asked for, about
    manifest = json.loads((tmp_path / "hard" / "synthetic.json").read_text())
    assert (manifest["style"], manifest["foreground"]) == ("hard", 0.15)
    assert "style" not in json.loads((tmp_path / "easy" / "synthetic.json").read_text())  # as it always was
    again = make_synthetic_dataset(tmp_path / "hard-again", 40, 2, 160, seed=5, style="hard")
    assert _files(again) == _files(tmp_path / "hard")  # the seed decides everything


def test_hard_scenes_draw_unlabelled_distractors_of_the_other_kinds(monkeypatch):
    """Distractors are shapes of the kinds that are not classes, drawn before the objects and never
    annotated."""
    style = synthetic_module.scene_style("hard")
    drawn = []
    real_mask = synthetic_module.shape_mask

    def recording_mask(kind, *args):
        drawn.append(kind)
        return real_mask(kind, *args)

    monkeypatch.setattr(synthetic_module, "shape_mask", recording_mask)
    image = np.zeros((96, 128, 3))
    synthetic_module._draw_distractors(image, style, SHAPES, np.random.default_rng(0))
    assert style.distractors[0] <= len(drawn) <= style.distractors[1] and set(drawn) <= set(NEW_KINDS)
    assert (image != 0).any(axis=-1).mean() > 0.01  # they cover part of the background
    drawn.clear()
    _, objects = render_scene(128, np.random.default_rng(1), SHAPES, style)
    distractors = [kind for kind in drawn if kind in NEW_KINDS]
    assert distractors and drawn[: len(distractors)] == distractors  # first, under the objects
    assert 0 < len(objects) <= len(drawn) - len(distractors)  # annotated: objects only (a placement may retry)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--foreground", "0.2"], "--foreground sets the hard style's share of the image in boxes: add --style hard"),
        (
            ["--style", "hard", "--foreground", "0.7"],
            "--foreground is the share of an image covered by boxes, in (0, 0.5]",
        ),
        (["--style", "harder"], "unknown synthetic style 'harder'; styles: easy, hard"),
    ],
)
def test_bad_style_options_are_one_line(tmp_path, options, fragment):
    from conftest import one_line
    from typer.testing import CliRunner

    from sparse_detr.cli import app

    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--num-train", "1", *options])
    one_line(result, 2, fragment)
    assert not (tmp_path / "d").exists()
