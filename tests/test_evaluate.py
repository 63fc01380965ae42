"""COCO evaluation: box conversion to COCO results, the 12 metrics, checkpoint evaluation."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.data import make_synthetic_dataset, synthetic_splits
from sparse_detr.data.source import DataSource
from sparse_detr.engine import METRIC_KEYS, coco_metrics, evaluate, evaluate_checkpoint, format_metrics
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
