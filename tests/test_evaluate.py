"""COCO evaluation: box conversion to COCO results, the 12 metrics, checkpoint evaluation."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.data.source import DataSource
from sparse_detr.engine import METRIC_KEYS, coco_metrics, evaluate, evaluate_checkpoint, format_metrics
from sparse_detr.engine.evaluate import metrics_json, per_class_frame, read_metrics
from sparse_detr.engine.run_config import EvalSettings
from sparse_detr.models import build_model

# two images, boxes xywh in pixels; category ids 1 and 3 (label = id)
IMAGES = [{"id": 7, "width": 100, "height": 80}, {"id": 9, "width": 60, "height": 120}]
ANNOTATIONS = [
    {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 30.0]},
    {"id": 2, "image_id": 7, "category_id": 3, "bbox": [50.0, 5.0, 45.0, 70.0]},
    {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0.0, 60.0, 60.0, 60.0]},
]


def ground_truth() -> COCO:
    coco = COCO()
    annotations = [{**a, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0} for a in ANNOTATIONS]
    categories = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    coco.dataset = {"images": IMAGES, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class Oracle(nn.Module):
    """Predicts the ground truth of each image (passed in by image order): query i = box i, with its
    label; one extra query predicts class 2, which has no category."""

    def __init__(self, num_classes: int = 4, num_queries: int = 5):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.queue: list[list[dict]] = []

    def forward(self, images, mask):
        logits = torch.full((len(images), self.num_queries, self.num_classes), -10.0)
        boxes = torch.full((len(images), self.num_queries, 4), 0.5)
        for n, image_annotations in enumerate(self.queue.pop(0)):
            for q, ann in enumerate(image_annotations):
                image = next(i for i in IMAGES if i["id"] == ann["image_id"])
                x, y, w, h = ann["bbox"]
                width, height = image["width"], image["height"]
                boxes[n, q] = torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
                logits[n, q, ann["category_id"]] = 10.0
            logits[n, -1, 2] = 10.0
        return {"pred_logits": logits, "pred_boxes": boxes}


def oracle_batches(model: Oracle, batch_size: int):
    for start in range(0, len(IMAGES), batch_size):
        batch = IMAGES[start : start + batch_size]
        model.queue.append([[a for a in ANNOTATIONS if a["image_id"] == image["id"]] for image in batch])
        targets = [
            {"image_id": torch.tensor(image["id"]), "orig_size": torch.tensor([image["height"], image["width"]])}
            for image in batch
        ]
        yield torch.zeros(len(batch), 3, 32, 32), torch.zeros(len(batch), 32, 32, dtype=torch.bool), targets


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perfect_detections_score_one(tmp_path, batch_size):
    model = Oracle()
    detections_file = tmp_path / "detections.json"
    metrics = evaluate(model, oracle_batches(model, batch_size), ground_truth(), {1: 1, 3: 3}, "cpu", detections_file)
    assert list(metrics) == list(METRIC_KEYS)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)
    assert math.isnan(metrics["APs"])  # no small box in the ground truth

    detections = json.loads(detections_file.read_text())
    assert {d["category_id"] for d in detections} == {1, 3}  # label 2 has no category: left out
    best = max((d for d in detections if d["image_id"] == 7), key=lambda d: (d["category_id"] == 1, d["score"]))
    assert best["bbox"] == pytest.approx([10.0, 20.0, 40.0, 30.0], abs=0.01)


def test_no_detections_and_subsets():
    gt = ground_truth()
    metrics, summary = coco_metrics(gt, [], [7, 9])
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    assert "Average Precision" in summary
    shifted = [{"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 30.0], "score": 0.9}]
    assert coco_metrics(gt, shifted, [7])[0]["AP"] < 1.0  # the second box of image 7 is missed
    with pytest.raises(ValueError, match="no images"):
        coco_metrics(gt, [], [])


def noisy_scene(seed: int = 0) -> tuple[COCO, list[dict]]:
    """Twelve images with boxes of three categories (one with no box at all), and detections: the boxes
    jittered, some missed, some duplicated, false positives, random scores."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    images = [{"id": i + 1, "width": 200, "height": 160} for i in range(12)]
    annotations, detections = [], []
    for image in images:
        for _ in range(int(uniform(1, 5))):
            category_id = [1, 2, 5][int(uniform(0, 2.999))] if image["id"] % 4 else 1
            w, h = uniform(8, 90), uniform(8, 70)
            box = [uniform(0, 200 - w), uniform(0, 160 - h), w, h]
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": category_id,
                                "bbox": box, "area": w * h, "iscrowd": 0})  # fmt: skip
            for _ in range(int(uniform(0, 2.5))):  # missed, found, or found twice
                jitter = [value + uniform(-0.15, 0.15) * side for value, side in zip(box, (w, h, w, h))]
                detections.append({"image_id": image["id"], "category_id": category_id, "bbox": jitter,
                                   "score": uniform(0.05, 1.0)})  # fmt: skip
        false_positive = [uniform(0, 100), uniform(0, 80), 30.0, 30.0]
        detections.append({"image_id": image["id"], "category_id": [1, 2, 5, 9][int(uniform(0, 3.999))],
                           "bbox": false_positive, "score": uniform(0.0, 0.6)})  # fmt: skip
    coco = COCO()
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}, {"id": 9, "name": "none"}]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, detections


def cocoeval_of_one_category(coco: COCO, detections: list[dict], category_id: int, image_ids) -> tuple[float, float]:
    """pycocotools' own AP and AP50 of one category: COCOeval restricted to it (``params.catIds``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.params.imgIds, evaluator.params.catIds = sorted(image_ids), [category_id]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[0], evaluator.stats[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_ap_is_pycocotools_per_category(seed):
    coco, detections = noisy_scene(seed)
    image_ids = coco.getImgIds()[:10]  # a subset: the boxes counted are those of the images evaluated
    metrics = coco_metrics(coco, detections, image_ids)[0]
    assert [entry.category_id for entry in metrics.per_class] == [1, 2, 5, 9]
    assert [entry.name for entry in metrics.per_class] == ["a", "b", "c", "none"]
    for entry in metrics.per_class:
        expected = len([a for a in coco.dataset["annotations"]
                        if a["category_id"] == entry.category_id and a["image_id"] in image_ids])  # fmt: skip
        assert entry.boxes == expected
        if entry.category_id == 9:  # no ground truth: pycocotools reports -1, the table NaN
            assert math.isnan(entry.AP) and math.isnan(entry.AP50)
            continue
        ap, ap50 = cocoeval_of_one_category(coco, detections, entry.category_id, image_ids)
        assert 0 < ap < 1 and ap50 > 0  # neither trivial nor perfect
        assert entry.AP == pytest.approx(ap, abs=1e-12) and entry.AP50 == pytest.approx(ap50, abs=1e-12)
    classes = [entry for entry in metrics.per_class if not math.isnan(entry.AP)]
    assert metrics["AP"] == pytest.approx(sum(entry.AP for entry in classes) / len(classes))  # the mean over classes


def test_per_class_ap_round_trips_through_the_metrics_file(tmp_path):
    coco, detections = noisy_scene()
    metrics = coco_metrics(coco, detections, coco.getImgIds())[0]
    path = tmp_path / "eval.json"
    path.write_text(metrics_json(metrics))
    stored = json.loads(path.read_text())
    assert stored["per_class"][0] == {"category_id": 1, "name": "a", "boxes": metrics.per_class[0].boxes,
                                      "AP": metrics.per_class[0].AP, "AP50": metrics.per_class[0].AP50}  # fmt: skip
    assert stored["per_class"][3]["AP"] is None  # NaN as null
    again = read_metrics(path)
    assert [entry.name for entry in again.per_class] == ["a", "b", "c", "none"]
    assert again.per_class[1] == metrics.per_class[1]
    table = per_class_frame(again)
    assert list(table["class"]) == ["a", "b", "c", "none"]
    assert table["AP"].iloc[0] == pytest.approx(metrics.per_class[0].AP)


def test_format_metrics_lists_the_twelve_numbers():
    metrics = dict.fromkeys(METRIC_KEYS, 0.25) | {"APs": math.nan}
    table = format_metrics(metrics)
    assert len(table.splitlines()) == 12
    assert "0.250" in table and "n/a" in table


def test_evaluate_checkpoint_with_keep_ratio_override(tmp_path):
    root = make_synthetic_dataset(tmp_path / "synth", num_train=1, num_val=2, image_size=96)
    _, _, val_images, val_ann = synthetic_splits(root)
    torch.manual_seed(0)
    model = build_model(apply_overrides(get_preset("tiny"), {"model.num_classes": 7}))
    path = save_checkpoint(tmp_path / "model.pth", model, train_config={"image_size": 96})

    split = DataSource(val_images=str(val_images), val_ann=str(val_ann))
    metrics = evaluate_checkpoint(path, EvalSettings(split, keep_ratio=0.5, batch_size=1, workers=0), tmp_path / "eval")
    assert list(metrics) == list(METRIC_KEYS)
    stored = json.loads((tmp_path / "eval" / "eval_model_rho0.5.json").read_text())
    assert stored["keep_ratio"] == 0.5 and stored["image_size"] == 96
    assert stored["AP"] == pytest.approx(metrics["AP"])
    assert isinstance(json.loads((tmp_path / "eval" / "detections_model_rho0.5.json").read_text()), list)

    small = build_model(apply_overrides(get_preset("tiny"), {"model.num_classes": 3}))
    small_path = save_checkpoint(tmp_path / "small.pth", small)
    with pytest.raises(ValueError, match="predicts 3 classes"):
        evaluate_checkpoint(small_path, EvalSettings(split, batch_size=1, workers=0), tmp_path / "eval")


def test_a_run_folder_is_evaluated_with_its_best_checkpoint_on_its_own_data(tmp_path, monkeypatch, library_lines):
    """`sdetr eval --checkpoint RUN` reads the run's data, image size and evaluation batch from its config.toml
    (not the built-in dataset's, nor the default batch), takes checkpoint_best.pth unless --last, and options
    still override them."""
    from typer.testing import CliRunner

    from sparse_detr.cli import app
    from sparse_detr.config import train_recipe
    from sparse_detr.engine.run_config import RunConfig

    own = make_synthetic_dataset(tmp_path / "own", num_train=1, num_val=3, image_size=96, seed=1)
    other = make_synthetic_dataset(tmp_path / "other", num_train=1, num_val=2, image_size=96, seed=2)
    config = apply_overrides(get_preset("tiny"), {"model.num_classes": 7})
    run = tmp_path / "run"
    train = train_recipe("tiny", image_size=96, batch_size=3, output_dir=str(run))
    run.mkdir()
    (run / "config.toml").write_text(RunConfig(config, train, DataSource(root=str(own))).to_toml())
    for seed, name in ((0, "checkpoint.pth"), (1, "checkpoint_best.pth")):
        torch.manual_seed(seed)
        save_checkpoint(run / name, build_model(config), train_config={"image_size": 96})
    monkeypatch.chdir(tmp_path)  # no runs/tiny here: nothing to fall back to

    def evaluated(*options: str) -> tuple[set[int], list[dict]]:
        result = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--workers", "0", *options])
        assert result.exit_code == 0, result.output
        assert "AP per class" in result.output
        name = "checkpoint" if "--last" in options else "checkpoint_best"
        detections = json.loads((run / f"detections_{name}.json").read_text())
        assert json.loads((run / f"eval_{name}.json").read_text())["image_size"] == 96
        return {detection["image_id"] for detection in detections}, detections

    best_images, best = evaluated()
    assert best_images == {1, 2, 3}  # the run's 3 validation images, not the built-in 100
    assert "images, rho 0.3, image size 96, batch 3, cpu" in library_lines()[-4]  # the run's batch
    last_images, last = evaluated("--last")
    assert last_images == {1, 2, 3} and last != best  # other weights
    assert evaluated("--data", str(other), "--batch-size", "1")[0] == {1, 2}  # options override the run's
    assert "2 images, rho 0.3, image size 96, batch 1, cpu" in library_lines()[-4]
