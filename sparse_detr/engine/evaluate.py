"""COCO box AP with pycocotools: detections of a data loader, gathered to rank 0, scored by COCOeval."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from sparse_detr.checkpoint import Category, category_differences, load_for_inference
from sparse_detr.data import CocoDetection, collate, eval_transform
from sparse_detr.engine import distributed
from sparse_detr.engine.run_config import EvalSettings
from sparse_detr.engine.sampling import BlockBatchSampler
from sparse_detr.errors import InputError, NonFiniteError, UsageError
from sparse_detr.models import postprocess
from sparse_detr.models.fast_inference import InferenceModel, prepare_for_inference
from sparse_detr.models.postprocess import MAX_DETECTIONS
from sparse_detr.utils.io import atomic_write_text, check_writable
from sparse_detr.utils.progress import track
from sparse_detr.zoo import ZOO, resolve_checkpoint

logger = logging.getLogger(__name__)
SCORED_OUTPUTS = ("pred_logits", "pred_boxes", "scores", "boxes")  # the outputs detections are made of
# COCOeval.stats, in order
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_DESCRIPTIONS = (
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP @[IoU=0.75 | area=all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
)


@torch.no_grad()
def predict(
    model: nn.Module | InferenceModel,
    data_loader: Iterable,
    label_to_category_id: Mapping[int, int],
    device: torch.device | str,
    top_k: int = MAX_DETECTIONS,
    source: str = "the model",
    progress: str | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """This process's detections in COCO results format (``bbox`` xywh in original-image pixels) and
    the ids of the images it saw. Labels without a category (unused slots) are left out.

    Batches the data set could not fill (None: unreadable images) are passed over, and so are batches the
    model cannot take (images too small for its queries), with a warning. ``model``: the detector (put in
    eval mode) or one prepared by :func:`~sparse_detr.models.prepare_for_inference`. ``progress``: the
    description of a progress bar (or lines) over the batches, shown by rank 0 alone (None: none).

    Raises:
        NonFiniteError: the model's outputs hold NaN or infinite values (``source`` names the model).
    """
    if isinstance(model, nn.Module):
        model.eval()
    detections, image_ids = [], []
    if progress is not None and distributed.get_rank() == 0:
        data_loader = track(data_loader, progress, unit="batches")
    for batch in data_loader:
        outputs = None if batch is None else _forward(model, *batch, device)
        if outputs is None:
            continue
        require_finite_outputs(outputs, source, getattr(model, "amp", None))
        targets = batch[2]
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        image_ids += [int(target["image_id"]) for target in targets]
        detections += coco_results(outputs, image_ids[-len(targets) :], sizes, label_to_category_id, top_k)
    return detections, image_ids


def _forward(model: nn.Module | InferenceModel, images, mask, targets, device) -> dict | None:
    """The outputs of a batch, or None with a warning when the model cannot take it (the padded batch is
    too small for its queries: then each of its images is too)."""
    try:
        return model(images.to(device), mask.to(device))
    except InputError as error:
        image_ids = ", ".join(str(int(target["image_id"])) for target in targets)
        warnings.warn(f"image id {image_ids}: {error}; left out of the evaluation", stacklevel=3)
        return None


def require_finite_outputs(outputs: Mapping[str, Any], source: str, amp: str | None = None) -> None:
    """Refuse outputs that hold NaN or infinite values: they would score as no detection (AP 0, an empty
    results file) instead of saying that the weights are broken.

    Raises:
        NonFiniteError: naming ``source`` (the checkpoint) and the first such output.
    """
    for key in SCORED_OUTPUTS:
        value = outputs.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            remedy = f"run it without --amp {amp} or " if amp else ""
            raise NonFiniteError(
                f"the outputs of {source} are not finite ({key} holds NaN or infinite values): its weights are "
                f"broken (a run that diverged?); {remedy}use an earlier checkpoint"
            )


def coco_results(
    outputs: dict,
    image_ids: Sequence[int],
    sizes: torch.Tensor,
    label_to_category_id: Mapping[int, int],
    top_k: int = MAX_DETECTIONS,
    threshold: float = 0.0,
) -> list[dict[str, Any]]:
    """COCO results of a batch of model outputs: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in the
    pixels of ``sizes`` (N, 2) (height, width of each original image) and ``score``; best first, at most
    ``top_k`` per image. Labels without a category (unused slots) and scores below ``threshold`` are left
    out; numbers are not rounded (COCOeval scores the numbers the model gave)."""
    pairs = outputs["pred_logits"].shape[1] * outputs["pred_logits"].shape[2]
    results = postprocess(outputs, sizes, top_k=min(top_k, pairs))
    return coco_detections(results, image_ids, label_to_category_id, threshold)


def coco_detections(
    results: Iterable[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int],
    threshold: float = 0.0,
) -> list[dict[str, Any]]:
    """COCO results of per-image detections (``scores``, ``labels``, ``boxes`` xyxy in pixels, as
    :func:`~sparse_detr.models.postprocess` gives them), best first; see :func:`coco_results`."""
    detections = []
    for image_id, result in zip(image_ids, results):
        boxes = result["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), boxes.tolist()):
            if label in label_to_category_id and score >= threshold:
                detections.append(
                    {"image_id": int(image_id), "category_id": int(label_to_category_id[label]), "bbox": box,
                     "score": score}
                )  # fmt: skip
    return detections


def coco_metrics(coco_gt: COCO, detections: list[dict[str, Any]], image_ids: Iterable[int]) -> tuple[Metrics, str]:
    """The 12 COCOeval bbox numbers on ``image_ids`` (fractions; NaN where the split has no ground-truth
    box of that size) with each category's AP and AP50 (:attr:`Metrics.per_class`), and pycocotools'
    summary text."""
    image_ids = sorted(set(image_ids))
    if not image_ids:
        raise InputError(
            "no images were evaluated: the validation images are all missing, unreadable or too small for the "
            "model (see the warnings above)"
        )
    with contextlib.redirect_stdout(io.StringIO()) as text:
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections)) if detections else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {key: float(value) if value >= 0 else math.nan for key, value in zip(METRIC_KEYS, evaluator.stats)}
    return Metrics(metrics, per_class=_per_class(evaluator, coco_gt, image_ids)), text.getvalue()


def _per_class(evaluator: COCOeval, coco_gt: COCO, image_ids: Sequence[int]) -> list[ClassAP]:
    """Each category's AP (IoU 0.50:0.95) and AP50 from the precision COCOeval accumulated, as its summary
    computes the all-category numbers (area all, 100 detections), over the categories' own precisions."""
    # precision: (IoU thresholds T, recall points R, categories K, area ranges A, max detections M); -1: no data
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    per_class = []
    for k, category_id in enumerate(evaluator.params.catIds):
        boxes = len(coco_gt.getAnnIds(imgIds=image_ids, catIds=[category_id], iscrowd=False))
        name = coco_gt.cats[category_id]["name"]
        per_class.append(ClassAP(int(category_id), name, boxes, _mean_valid(precision[:, :, k]),
                                 _mean_valid(precision[0, :, k])))  # fmt: skip
    return per_class


def _mean_valid(values) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else math.nan


def _empty_results(coco_gt: COCO) -> COCO:
    """A results index with no detection (``loadRes`` refuses an empty list)."""
    results = COCO()
    results.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    results.createIndex()
    return results


@dataclass(frozen=True)
class ClassAP:
    """One category's AP (IoU 0.50:0.95) and AP50 on the images evaluated, and its ground-truth boxes there
    (NaN APs: no box of it and no detection)."""

    category_id: int
    name: str
    boxes: int
    AP: float
    AP50: float


class Metrics(dict):
    """The 12 COCOeval numbers by key (:data:`METRIC_KEYS`), with ``skipped_image_ids``: the images of the
    ground truth left out of them (missing, unreadable, or too small for the model), and ``per_class``: each
    category's :class:`ClassAP`; :func:`metrics_json` records both beside the numbers."""

    def __init__(
        self, values: Mapping[str, float], skipped_image_ids: Iterable[int] = (), per_class: Sequence[ClassAP] = ()
    ):
        super().__init__(values)
        self.skipped_image_ids = sorted(skipped_image_ids)
        self.per_class = list(per_class)


def evaluate(
    model: nn.Module | InferenceModel,
    data_loader: Iterable,
    coco_gt: COCO,
    label_to_category_id: Mapping[int, int],
    device: torch.device | str,
    detections_file: str | Path | None = None,
    source: str = "the model",
    progress: str | None = None,
) -> Metrics:
    """COCO box metrics of ``model`` (see :func:`predict`; ``source`` names it in errors) on ``data_loader``
    (batches of ``collate``: images, mask, targets with ``image_id`` and ``orig_size``).

    Images of ``coco_gt`` the data set or the model could not take are left out, with a warning that counts
    them: the metrics are those of the images evaluated, and :attr:`Metrics.skipped_image_ids` lists the
    others. Distributed: each process predicts its block of batches (:func:`build_eval_loader`), rank 0
    merges them, scores them and writes ``detections_file`` (COCO results JSON); every process returns the
    same metrics. ``progress``: the description of the progress over the batches (see :func:`predict`), which
    also brings a status line before the scoring.
    """
    detections, image_ids = predict(model, data_loader, label_to_category_id, device, source=source, progress=progress)
    gathered = distributed.gather_to_main((detections, image_ids))
    metrics = None
    if gathered is not None:
        merged = [detection for shard_detections, _ in gathered for detection in shard_detections]
        seen = {image_id for _, shard_ids in gathered for image_id in shard_ids}
        skipped = set(coco_gt.getImgIds()) - seen
        if seen and skipped:
            total = len(seen) + len(skipped)
            warnings.warn(
                f"{len(skipped)} of {total} images could not be evaluated (see the warnings above): "
                f"the metrics are those of the other {len(seen)}",
                stacklevel=2,
            )
        if detections_file is not None:
            atomic_write_text(detections_file, json.dumps(merged))
        if progress is not None:  # COCOeval takes a minute on COCO's 5000 images
            logger.info(f"scoring {len(merged)} detections of {len(seen)} images with COCOeval…")
        scored = coco_metrics(coco_gt, merged, seen)[0]
        metrics = Metrics(scored, skipped, scored.per_class)
    return distributed.broadcast_from_main(metrics)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """pycocotools' 12-line table."""
    lines = []
    for key, description in zip(METRIC_KEYS, _DESCRIPTIONS):
        value = metrics[key]
        lines.append(f"{description:<52} = {'n/a' if math.isnan(value) else f'{value:.3f}'}  ({key})")
    return "\n".join(lines)


def metrics_json(metrics: Mapping[str, float], **extra: Any) -> str:
    """``metrics`` (NaN written as null), the images left out of them (``images_skipped``, their count, and
    ``skipped_image_ids``) and each category's AP (``per_class``) when ``metrics`` are :class:`Metrics`,
    and ``extra`` entries, as indented JSON."""
    clean = {key: _json_number(value) for key, value in metrics.items()}
    if isinstance(metrics, Metrics):
        clean.update(images_skipped=len(metrics.skipped_image_ids), skipped_image_ids=metrics.skipped_image_ids)
        clean["per_class"] = [{key: _json_number(value) for key, value in dataclasses.asdict(entry).items()}
                              for entry in metrics.per_class]  # fmt: skip
    return json.dumps({**clean, **extra}, indent=2)


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def read_metrics(path: str | Path) -> Metrics:
    """The metrics a file of :func:`metrics_json` holds (null read as NaN), with the images left out and the
    categories' APs (files written before they were recorded have none)."""
    stored = json.loads(Path(path).read_text())
    values = {key: math.nan if stored.get(key) is None else stored[key] for key in METRIC_KEYS}
    per_class = [ClassAP(**{key: math.nan if value is None else value for key, value in entry.items()})
                 for entry in stored.get("per_class", ())]  # fmt: skip
    return Metrics(values, stored.get("skipped_image_ids", ()), per_class)


def per_class_frame(metrics: Metrics) -> pandas.DataFrame:
    """One row per category (name, id, ground-truth boxes, AP and AP50), by category id, for the table
    ``sdetr eval`` and ``sdetr train`` print."""
    rows = [{"class": entry.name, "id": entry.category_id, "boxes": entry.boxes, "AP": entry.AP,
             "AP50": entry.AP50} for entry in metrics.per_class]  # fmt: skip
    return pandas.DataFrame(rows, columns=["class", "id", "boxes", "AP", "AP50"])


def build_eval_loader(dataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in order; under ``torchrun`` each process takes a contiguous block of them
    (:class:`~sparse_detr.engine.sampling.BlockBatchSampler`), so every image shares its batch with the
    same images as in one process, and distributed evaluation gives the single-process numbers."""
    batches = BlockBatchSampler(len(dataset), batch_size, distributed.get_rank(), distributed.get_world_size())
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)


def encoder_tokens(model: nn.Module, height: int, width: int) -> int:
    """Encoder tokens of one (height, width) input: a ``ceil(side / stride)`` map per backbone level, then
    each extra level half of the one before (stride-2 convolutions)."""
    levels = [(math.ceil(height / stride), math.ceil(width / stride)) for stride in model.backbone[0].strides]
    levels = levels[: len(model.input_proj)]
    while len(levels) < len(model.input_proj):
        levels.append((math.ceil(levels[-1][0] / 2), math.ceil(levels[-1][1] / 2)))
    return sum(h * w for h, w in levels)


def check_image_size(model: nn.Module, image_size: int, source: str | Path) -> None:
    """Refuse a shorter side at which the two-stage ``model`` cannot take its queries from the encoder
    tokens of an image (a square one gives the fewest): every image, or some, would be left out.

    Raises:
        UsageError: naming --image-size and the smallest size that works.
    """
    queries = model.config.model.num_queries
    if not model.config.model.two_stage or encoder_tokens(model, image_size, image_size) >= queries:
        return
    enough = next(size for size in itertools.count(image_size) if encoder_tokens(model, size, size) >= queries)
    raise UsageError(
        f"--image-size {image_size} is too small for {source}: a square image gives "
        f"{encoder_tokens(model, image_size, image_size)} encoder tokens, fewer than its {queries} queries; "
        f"use --image-size {enough} or more"
    )


def check_split_classes(
    dataset: CocoDetection,
    val_ann: str | Path,
    num_classes: int,
    categories: Mapping[int, Category] | None,
    source: str | Path,
    allow_other_categories: bool = False,
) -> None:
    """Refuse to evaluate a model of ``num_classes`` classes named ``categories`` (None: unnamed) from
    ``source`` on a split whose labels it cannot predict, or whose categories are others than its own.

    Raises:
        UsageError: naming the split, the model and what to do instead.
    """
    if dataset.num_classes > num_classes:
        raise UsageError(
            f"{val_ann} has class labels up to {dataset.num_classes - 1} but {source} predicts "
            f"{num_classes} classes: evaluate it on the dataset it was trained for"
        )
    differences = category_differences(categories, dataset.category_names)
    if differences and not allow_other_categories:
        raise UsageError(
            f"{source} was trained on other categories than {val_ann} ({len(differences)} differ; "
            f"{differences[0]}): its AP here would mean nothing; evaluate it on its own data, fine-tune it "
            "(sdetr train --init), or pass --allow-other-categories"
        )


def evaluate_checkpoint(
    checkpoint: str | Path, settings: EvalSettings = EvalSettings(), output_dir: str | Path | None = None
) -> Metrics:
    """Evaluate a checkpoint file (this project's or a released one) on the validation split of
    ``settings.data`` (see :class:`~sparse_detr.engine.run_config.EvalSettings` for what else they say).

    ``output_dir``: where ``eval_<name>.json`` (the metrics) and ``detections_<name>.json`` (COCO results) go,
    ``<name>`` being the checkpoint's stem plus ``_rho<R>`` when ``settings.keep_ratio`` is not the trained
    one; default the checkpoint's folder. Checked to be writable before the evaluation starts.

    Returns:
        ``{AP, AP50, ..., ARl}`` (:class:`Metrics`, with the images left out) on every process.

    Raises:
        UsageError: an image size too small for the model (see :func:`check_image_size`), a dataset with more
            classes than the model predicts, or other categories than it was trained on (unless
            ``settings.allow_other_categories``).
        NonFiniteError: the model's outputs are not finite.
    """
    val_images, val_ann = settings.data.val_split()
    info = distributed.init_distributed(settings.device)
    checkpoint = Path(checkpoint)
    out = check_writable(output_dir if output_dir is not None else checkpoint.parent)
    loaded = load_for_inference(checkpoint, info.device, settings.overrides, settings.trust_checkpoint)
    model, keep_ratio = loaded.model, settings.keep_ratio
    image_size = loaded.image_size if settings.image_size is None else settings.image_size
    transform = eval_transform(image_size)
    check_image_size(model, image_size, checkpoint)
    dataset = CocoDetection(val_images, val_ann, transform)
    check_split_classes(dataset, val_ann, model.config.model.num_classes, loaded.stored_categories, checkpoint,
                        settings.allow_other_categories)  # fmt: skip
    if keep_ratio == model.keep_ratio:
        keep_ratio = None  # the trained keep ratio: the plain file names
    if keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)
    name = checkpoint.stem + (f"_rho{keep_ratio:g}" if keep_ratio is not None else "")
    if info.is_main:
        logger.info(_eval_header(checkpoint, dataset, model.keep_ratio, image_size, settings.batch_size, info.device))
    loader = build_eval_loader(dataset, settings.batch_size, settings.workers)
    runner = prepare_for_inference(model, settings.amp, settings.compile, settings.fast)
    detections_file = out / f"detections_{name}.json"
    metrics = evaluate(
        runner, loader, dataset.coco, dataset.label_to_category_id, info.device, detections_file, str(checkpoint),
        progress="evaluating",
    )  # fmt: skip
    if info.is_main:
        inference = runner.dtype + (", compiled" if settings.compile else "") + ("" if settings.fast else ", plain")
        extra = {"checkpoint": str(checkpoint), "keep_ratio": model.keep_ratio, "image_size": image_size,
                 "inference": inference}  # fmt: skip
        atomic_write_text(out / f"eval_{name}.json", metrics_json(metrics, **extra))
        logger.info(f"wrote the metrics to {out / f'eval_{name}.json'}")
        logger.info(f"wrote the detections (COCO results) to {detections_file}")
    return metrics


def _eval_header(
    checkpoint: Path, dataset: CocoDetection, keep_ratio: float, image_size: int, batch_size: int, device: torch.device
) -> str:
    """The line before an evaluation: what is evaluated on which images, and how."""
    sparsity = f"rho {keep_ratio:g}" if keep_ratio > 0 else "dense (no token sparsity)"
    return (
        f"evaluating {checkpoint} on {dataset.images_dir} ({dataset.annotations_file}): {len(dataset)} images, "
        f"{sparsity}, image size {image_size}, batch {batch_size}, {device}"
    )


def evaluate_settings(
    checkpoint: str | Path | None, settings: EvalSettings, output_dir: str | Path | None = None, last: bool = False
) -> Metrics:
    """``sdetr eval``: :func:`evaluate_checkpoint` of a checkpoint file, run folder (its best checkpoint, or
    its last with ``last``) or zoo name (see :func:`~sparse_detr.zoo.resolve_checkpoint`); results go to
    ``output_dir``, by default the checkpoint's folder, or ``runs/eval/<name>`` for a zoo name (not into the
    download cache)."""
    path = resolve_checkpoint(checkpoint, last=last)
    if output_dir is None and str(checkpoint) in ZOO and not Path(checkpoint).exists():
        output_dir = Path("runs") / "eval" / str(checkpoint)
    return evaluate_checkpoint(path, settings, output_dir)
