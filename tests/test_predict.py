"""sdetr predict: image inputs, class names, detections in original-image pixels, COCO results JSON."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CATEGORIES, one_line, save_tiny_checkpoint
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
from sparse_detr.viz.detections import class_colour, draw_detections

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


# -- drawings: sdetr predict --draw DIR and draw_detections ----------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
GREY = (128, 128, 128)


def _pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _changed(drawn, original) -> np.ndarray:
    """(H, W) True where the drawing differs from the original image."""
    return np.any(_pixels(drawn) != _pixels(original), axis=-1)


def test_a_drawing_changes_the_boxes_labels_and_legend_only():
    image = Image.new("RGB", (320, 240), GREY)
    detections = [
        {"category_id": 11, "category_name": "disc", "bbox": [40.0, 60.0, 80.0, 50.0], "score": 0.9},
        {"category_id": 12, "category_name": "square", "bbox": [200.0, 0.0, 100.0, 90.0], "score": 0.4},
    ]
    drawn = draw_detections(image, detections)
    assert drawn.size == image.size and drawn.mode == "RGB" and _pixels(image).max() == 128  # the input is kept
    changed, pixels = _changed(drawn, image), _pixels(drawn)
    assert tuple(pixels[85, 40]) == class_colour(11) and tuple(pixels[45, 300]) == class_colour(12)  # outlines
    assert class_colour(11) != class_colour(12)
    assert changed[60:110, 40].all() and changed[60, 40:120].all() and changed[0:90, 300].all()
    assert changed[45:60, 40:70].any()  # the label above the first box
    assert changed[2:16, 202:240].any()  # the second one's, inside its box at the image's top edge
    assert not changed[75:105, 45:115].any()  # inside the first box, below its label
    assert not changed[120:200, 150:320].any() and not changed[:50, 130:195].any()  # far from every box
    legend = changed[205:, :70]  # the bottom-left corner: the classes and their counts
    assert legend[-5:, :20].all() and legend.mean() > 0.5


def test_a_drawing_without_detections_holds_only_the_legend_note():
    image = Image.new("RGB", (200, 150), GREY)
    changed = _changed(draw_detections(image, []), image)
    rows, columns = np.nonzero(changed)
    assert changed.any() and columns.min() == 0 and rows.max() == 149  # the bottom-left corner
    assert rows.min() > 110 and columns.max() < 120


def _scene_folder(folder: Path) -> Path:
    """A PNG and a JPEG scene, and a file that is no image: predict and draw the two, fail the third."""
    folder.mkdir()
    render_scene(96, np.random.default_rng(0))[0].save(folder / "scene0.png")
    render_scene(128, np.random.default_rng(1))[0].save(folder / "scene1.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_predict_draws_every_image_that_ran(checkpoint, tmp_path):
    images = _scene_folder(tmp_path / "images")
    drawn, out = tmp_path / "drawn", tmp_path / "detections.json"
    args = ["predict", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--threshold", "0", "--draw", str(drawn)])
    one_line(result, 1, "1 of 3 image(s) failed")  # one bad image costs that image only
    assert f"to {out} and 2 drawing(s) to {drawn}" in " ".join(result.output.split())
    assert sorted(path.name for path in drawn.iterdir()) == ["scene0.png", "scene1.jpg"]
    results = json.loads(out.read_text())
    for name, image_format in (("scene0.png", "PNG"), ("scene1.jpg", "JPEG")):
        original, drawing = Image.open(images / name), Image.open(drawn / name)
        assert drawing.format == image_format and drawing.size == original.size
        assert any(Path(r["file_name"]).name == name for r in results)
    assert _changed(drawn / "scene0.png", images / "scene0.png").mean() > 0.05  # lossless: only what was drawn

    result = runner.invoke(app, [*args, "--draw", str(drawn), "--force", "--threshold", "1"])
    assert result.exit_code == 1 and json.loads(out.read_text()) == []  # an empty COCO results file is valid
    hint = [line for line in result.output.splitlines() if line.startswith("no detection scored at least 1")]
    assert len(hint) == 1 and "try --threshold 0.05" in hint[0]
    changed = _changed(drawn / "scene0.png", images / "scene0.png")
    rows, columns = np.nonzero(changed)
    assert columns.min() == 0 and rows.max() == 95 and rows.min() > 60 and columns.max() < 90  # the note only


def test_bad_draw_folders_get_one_line_before_any_work(tmp_path):
    images = _scene_folder(tmp_path / "images")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "scene0.png").write_bytes(b"an earlier drawing")
    args = ["predict", str(images / "scene0.png"), "--checkpoint", "missing.pth", "--out", str(tmp_path / "d.json")]
    cases = [
        (images / "scene0.png", "is a file: give a folder"),
        (images, "holds the input images"),
        (images / ".." / "images", "holds the input images"),
        (tmp_path / "taken", "scene0.png exists (1 drawing(s) would be overwritten): pass --force"),
    ]
    for folder, message in cases:
        one_line(runner.invoke(app, [*args, "--draw", str(folder)]), 2, message)
    two_scenes = [str(images / "scene0.png"), str(tmp_path / "taken" / "scene0.png")]
    result = runner.invoke(app, ["predict", *two_scenes, "--checkpoint", "missing.pth", "--draw", str(tmp_path / "x")])
    one_line(result, 2, "would both be drawn to", "rename one of them")
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "x").exists()


def test_predict_onnx_draws_its_boxes(tmp_path):
    from test_bad_input import GOOD_METADATA, constant_detector  # a small exported-detector stand-in

    onnx_file = constant_detector(tmp_path / "detector.onnx", json.dumps(GOOD_METADATA))
    image = tmp_path / "images" / "scene.png"
    image.parent.mkdir()
    Image.new("RGB", (80, 64), GREY).save(image)
    out, drawn = tmp_path / "detections.json", tmp_path / "drawn"
    result = runner.invoke(
        app, ["predict", str(image), "--onnx", str(onnx_file), "--out", str(out), "--draw", str(drawn)]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())) == 5  # one centred box (24..56, 22..42), five scores
    changed = _changed(drawn / "scene.png", image)
    assert changed[23:41, 24].all() and changed[23:41, 56].all() and not changed[26:40, 27:53].any()
    assert not changed[45:, 60:].any()  # right of the legend, below the box and its label
    assert Predictor.load(onnx_file)(image) == json.loads(out.read_text())  # the Python predictor, the same


def test_the_readme_python_predictor_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## Visualize and predict", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len([line for line in code.splitlines() if line and not line.startswith("from ")]) <= 3
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pth")
    render_scene(96, np.random.default_rng(0))[0].save(tmp_path / "photo.jpg")
    namespace: dict = {}
    exec(code, namespace)
    assert isinstance(namespace["predictor"], Predictor) and isinstance(namespace["detections"], list)
    assert Image.open(tmp_path / "photo_drawn.png").size == Image.open(tmp_path / "photo.jpg").size


def test_a_run_folder_predicts_with_its_best_checkpoint_unless_last(checkpoint, tmp_path):
    """predict and visualize take a run folder's checkpoint_best.pth, or with --last its checkpoint.pth."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(checkpoint.read_bytes())
    torch.manual_seed(1)
    best = save_tiny_checkpoint(run / "checkpoint_best.pth", keep_ratio=0.2)
    assert Predictor.load(run).checkpoint == best
    assert Predictor.load(run, last=True).checkpoint == run / "checkpoint.pth"
    folder = _images(tmp_path / "images", count=1)

    def predicted(*options: str) -> list[dict]:
        out = tmp_path / f"detections{len(options)}.json"
        result = runner.invoke(app, ["predict", str(folder), "--out", str(out), "--threshold", "0", *options])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    assert predicted("--checkpoint", str(run)) == predicted("--checkpoint", str(best), "--device", "cpu")
    last = predicted("--checkpoint", str(checkpoint), "--last", "--force")
    assert predicted("--checkpoint", str(run), "--last") == last
