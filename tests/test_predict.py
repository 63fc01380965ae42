"""sdetr predict: image inputs, class names, detections in original-image pixels, COCO results JSON."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import TINY_CATEGORIES, save_tiny_checkpoint
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from sparse_detr.checkpoint import checkpoint_categories
from sparse_detr.cli import app
from sparse_detr.data.coco_categories import COCO_CATEGORY_NAMES
from sparse_detr.data.synthetic import render_scene
from sparse_detr.inference import (
    Predictor,
    expand_image_paths,
    image_ids_from_annotations,
    load_predictor,
)

runner = CliRunner()
CATEGORIES = TINY_CATEGORIES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pth")


def _images(folder, count=2):
    folder.mkdir(exist_ok=True)
    for index in range(count):
        render_scene(96, np.random.default_rng(index))[0].save(folder / f"scene{index}.png")
    return folder


def _ground_truth(path, images):
    """A small COCO instances file listing ``images`` under ids 7, 9, ... with one box each."""
    entries = [
        {"id": 7 + 2 * i, "file_name": p.name, "width": Image.open(p).width, "height": Image.open(p).height}
        for i, p in enumerate(images)
    ]
    annotations = [
        {"id": i + 1, "image_id": e["id"], "category_id": 12, "bbox": [5, 5, 30, 20], "area": 600, "iscrowd": 0}
        for i, e in enumerate(entries)
    ]
    categories = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES.values()]
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def test_expand_image_paths(tmp_path):
    folder = _images(tmp_path / "images")
    (folder / "notes.txt").write_text("no image")
    single = folder / "scene1.png"
    assert expand_image_paths([folder]) == [folder / "scene0.png", single]
    assert expand_image_paths([str(single), str(folder / "*.png")]) == [single, folder / "scene0.png"]
    assert expand_image_paths([str(tmp_path / "**" / "scene0.png")]) == [folder / "scene0.png"]
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        expand_image_paths([tmp_path / "missing.png"])
    with pytest.raises(FileNotFoundError, match="no image matches"):
        expand_image_paths([str(folder / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        expand_image_paths([tmp_path / "empty"])


def test_categories_of_each_kind_of_checkpoint():
    stored = checkpoint_categories({"categories": CATEGORIES}, 4)
    assert stored[2].id == 12 and stored[2].name == "square" and 0 not in stored
    official = checkpoint_categories({}, 91)
    assert len(official) == 80 == len(COCO_CATEGORY_NAMES)
    assert official[1].name == "person" and official[90].name == "toothbrush" and 12 not in official
    assert checkpoint_categories({}, 5)[3].name == "class 3"
    with pytest.raises(ValueError, match="'categories' must map"):
        checkpoint_categories({"categories": {1: "disc"}}, 4)


def test_boxes_are_in_original_image_pixels(checkpoint, tmp_path):
    predictor = load_predictor(checkpoint, device="cpu")
    assert isinstance(predictor, Predictor) and predictor.image_size == 64
    Image.new("RGB", (300, 200)).save(tmp_path / "wide.png")
    image = predictor.read_image(tmp_path / "wide.png")
    assert image.original_size == (200, 300) and image.resized_size == (64, 96)
    logits = torch.full((1, 20, 4), -10.0)
    logits[0, 4, 2] = 3.0  # query 4, label 2 (category 12)
    logits[0, 5, 0] = 5.0  # label 0 has no category: left out
    boxes = torch.full((1, 20, 4), 0.5)
    boxes[0, 4] = torch.tensor([0.5, 0.5, 0.2, 0.4])  # normalized cxcywh
    detections = predictor.detections({"pred_logits": logits, "pred_boxes": boxes}, [image], [42], threshold=0.5)
    assert detections == [
        {
            "image_id": 42,
            "category_id": 12,
            "bbox": pytest.approx([120.0, 60.0, 60.0, 80.0], abs=1e-4),
            "score": pytest.approx(float(torch.sigmoid(torch.tensor(3.0)))),
            "category_name": "square",
            "file_name": str(tmp_path / "wide.png"),
        }
    ]


@pytest.mark.slow
def test_cli_writes_coco_results_that_pycocotools_loads(checkpoint, tmp_path):
    folder = _images(tmp_path / "images")
    gt_file = _ground_truth(tmp_path / "gt.json", sorted(folder.glob("*.png")))
    out = tmp_path / "detections.json"
    args = ["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--threshold", "0", "--ann", str(gt_file)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert f"wrote {len(results)} detection(s) of 2 image(s)" in result.output
    # 100 (query, label) pairs per image, less those of label 0, which has no category
    assert 0 < len(results) <= 200 and {r["image_id"] for r in results} == {7, 9}
    assert {r["category_id"] for r in results} <= {11, 12, 13}
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = COCO(str(gt_file)).loadRes(str(out))
    assert len(loaded.getAnnIds()) == len(results) and all(ann["area"] > 0 for ann in loaded.anns.values())
    assert "class" in result.output and "score" in result.output  # the table

    result = runner.invoke(app, [*args, "--threshold", "0.5"])
    assert result.exit_code == 2 and "detections.json exists" in result.output and "--force" in result.output
    result = runner.invoke(app, [*args, "--threshold", "0.5", "--force", "--rho", "0.5"])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert all(r["score"] >= 0.5 for r in results) and {r["image_id"] for r in results} <= {1, 2}


def test_image_ids_from_annotations(tmp_path):
    folder = _images(tmp_path / "images")
    paths = sorted(folder.glob("*.png"))
    gt_file = _ground_truth(tmp_path / "gt.json", paths[:1])
    assert image_ids_from_annotations(gt_file, paths[:1]) == [7]
    with pytest.raises(ValueError, match="scene1.png is not listed in"):
        image_ids_from_annotations(gt_file, paths)


def test_cli_errors(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "images", count=1)
    result = runner.invoke(app, ["predict", "images"])
    assert result.exit_code == 1 and "run `sdetr train` first or pass --checkpoint" in result.output
    result = runner.invoke(app, ["predict", "nowhere/*.png", "--checkpoint", str(checkpoint)])
    assert result.exit_code == 1 and "no image matches" in result.output
    result = runner.invoke(app, ["predict", "images", "--checkpoint", str(tmp_path / "missing.pth")])
    assert result.exit_code == 1 and "checkpoint not found" in result.output
    assert not (tmp_path / "detections.json").exists()
