"""Detection on image files: a checkpoint with its class names, images read and resized as in evaluation,
and COCO-style results in original-image pixels."""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors

from sparse_detr.checkpoint import Category, load_for_inference
from sparse_detr.data import CocoDetection, eval_transform, load_coco_annotations, load_rgb_image
from sparse_detr.engine.evaluate import (
    Metrics,
    build_eval_loader,
    check_image_size,
    check_split_classes,
    coco_detections,
    coco_results,
    evaluate,
    metrics_json,
    require_finite_outputs,
)
from sparse_detr.engine.interrupts import StopSignals
from sparse_detr.engine.run_config import EvalSettings
from sparse_detr.errors import InputError, Interrupted, MissingFileError, UsageError
from sparse_detr.export import OnnxDetector
from sparse_detr.models import DeformableDETR, pad_images
from sparse_detr.models.fast_inference import InferenceModel, prepare_for_inference
from sparse_detr.utils.device import resolve_device
from sparse_detr.utils.io import atomic_write_text, check_writable
from sparse_detr.utils.timer import Timer
from sparse_detr.zoo import resolve_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_pattern(text: str) -> bool:
    return any(char in text for char in "*?[")


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (their images, not recursive) and glob patterns -> image paths, in order, once each.

    Raises:
        FileNotFoundError: one line naming the input that is missing or holds no image.
    """
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise MissingFileError(f"{text}: the folder holds no image ({' '.join(IMAGE_SUFFIXES)})")
        elif _is_pattern(text):
            matches = (Path(match) for match in glob.glob(text, recursive=True))
            found = sorted(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise MissingFileError(f"{text}: no image matches this pattern")
        else:
            raise MissingFileError(f"image not found: {text}")
        paths.extend(found)
    if not paths:
        raise MissingFileError("no image given: pass image files, folders or glob patterns")
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)  # the first spelling of a file wins
    return list(unique.values())


@dataclass
class InputImage:
    """One image file: ``pixels`` RGB in its displayed orientation, ``tensor`` (3, h, w) the normalized,
    resized model input."""

    path: Path
    pixels: PIL.Image.Image
    tensor: torch.Tensor

    @property
    def original_size(self) -> tuple[int, int]:
        """(height, width) of the file's image."""
        return self.pixels.height, self.pixels.width

    @property
    def resized_size(self) -> tuple[int, int]:
        """(height, width) the model sees, before any batch padding."""
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])


@dataclass
class Predictor:
    """A checkpoint (prepared for inference: see :func:`~sparse_detr.models.prepare_for_inference`) or an
    exported ONNX file (run by onnxruntime) ready for inference at shorter side ``image_size``."""

    runner: InferenceModel | OnnxDetector
    categories: dict[int, Category]
    image_size: int
    device: torch.device
    checkpoint: Path
    transform: Callable = field(init=False, repr=False)
    warmed_up: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.image_size)

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> Predictor:
        """The predictor of a checkpoint file, run folder or zoo name (``options``: those of
        :func:`load_predictor`) or of an exported ``.onnx`` file (those of :func:`load_onnx_predictor`)."""
        if checkpoint is not None and Path(checkpoint).suffix == ".onnx":
            return load_onnx_predictor(checkpoint, **options)
        return load_predictor(checkpoint, **options)

    def __call__(self, path: str | Path, threshold: float = 0.3, image_id: int = 1) -> list[dict[str, Any]]:
        """The COCO results of the image file ``path`` scoring at least ``threshold`` (see
        :meth:`detections`), under ``image_id``: one forward pass.

        Raises:
            ImageLoadError: the file cannot be read. InputError: the image is too small for the model.
        """
        image = self.read_image(path)
        outputs, _ = self.run([image])
        return self.detections(outputs, [image], [image_id], threshold)

    @property
    def model(self) -> DeformableDETR:
        """The PyTorch detector (its config, keep ratio and scoring network).

        Raises:
            UsageError: the predictor runs an ONNX file.
        """
        if isinstance(self.runner, OnnxDetector):
            raise UsageError(f"{self.checkpoint} is an ONNX file: this needs the PyTorch checkpoint")
        return self.runner.model

    def read_image(self, path: str | Path) -> InputImage:
        """Load ``path`` (any PIL mode, EXIF orientation applied) and resize it as in evaluation.

        Raises:
            ImageLoadError: one line naming the file when it cannot be read.
        """
        pixels = load_rgb_image(path)
        no_boxes = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format="XYXY", canvas_size=(pixels.height, pixels.width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        tensor, _ = self.transform(pixels, no_boxes)
        return InputImage(Path(path), pixels, tensor)

    @torch.no_grad()
    def run(
        self, images: Sequence[InputImage], keep_ratio: float | None = None, warm_up: bool = False
    ) -> tuple[dict, float]:
        """Model outputs for the padded batch of ``images`` (see ``DeformableDETR.forward``; an ONNX file's
        named outputs) and the seconds the forward pass took (device synchronized). With ``warm_up``, the
        predictor's first run does one untimed pass before (lazy CUDA and allocator set-up would count
        otherwise).

        Raises:
            NonFiniteError: the outputs hold NaN or infinite values (broken weights), naming the checkpoint.
        """
        batch, mask = pad_images([image.tensor for image in images])
        batch, mask = batch.to(self.device), mask.to(self.device)
        extra = {"keep_ratio": keep_ratio}
        if isinstance(self.runner, OnnxDetector) and self.runner.takes_original_sizes:
            extra["orig_sizes"] = torch.tensor([image.original_size for image in images])
        if warm_up and not self.warmed_up:
            self.runner(batch, mask, **extra)
            self.warmed_up = True
        with Timer(self.device) as timer:
            outputs = self.runner(batch, mask, **extra)
        require_finite_outputs(outputs, str(self.checkpoint), getattr(self.runner, "amp", None))
        return outputs, timer.seconds

    def detections(
        self, outputs: dict, images: Sequence[InputImage], image_ids: Sequence[int], threshold: float = 0.0
    ) -> list[dict[str, Any]]:
        """COCO results of a batch: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original-image
        pixels, ``score``, plus ``category_name`` and ``file_name``; best first per image, at most 100
        per image, those scoring below ``threshold`` and labels without a category left out."""
        sizes = torch.tensor([image.original_size for image in images])
        label_to_category_id = {label: category.id for label, category in self.categories.items()}
        names = {category.id: category.name for category in self.categories.values()}
        paths = dict(zip(image_ids, (str(image.path) for image in images)))
        if "scores" in outputs:  # an ONNX graph that ends in post-processing
            per_image = [dict(zip(("scores", "labels", "boxes"), values))
                         for values in zip(outputs["scores"], outputs["labels"], outputs["boxes"])]  # fmt: skip
            results = coco_detections(per_image, image_ids, label_to_category_id, threshold)
        else:
            results = coco_results(outputs, image_ids, sizes, label_to_category_id, threshold=threshold)
        return [
            {**result, "category_name": names[result["category_id"]], "file_name": paths[result["image_id"]]}
            for result in results
        ]


def load_predictor(
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    keep_ratio: float | None = None,
    trust_checkpoint: bool = False,
    amp: str | None = None,
    compile: bool = False,
    fast: bool = True,
    last: bool = False,
) -> Predictor:
    """The model of ``checkpoint`` (a file, run folder: its best checkpoint, or its last with ``last``, or
    zoo name; see :func:`resolve_checkpoint`) on ``device`` (default cuda when available), prepared for
    inference, with its class names.

    Args:
        image_size: shorter side of the model input; default the run's ``train_config.image_size``,
            else 800.
        keep_ratio: encoder keep ratio ρ instead of the trained one (0: every token, no scoring).
        amp, compile, fast: how the model runs, see :func:`~sparse_detr.models.prepare_for_inference`.
    """
    device = resolve_device(device)
    loaded = load_for_inference(resolve_checkpoint(checkpoint, last=last), device, trust_checkpoint=trust_checkpoint)
    image_size = loaded.image_size if image_size is None else image_size
    check_image_size(loaded.model, image_size, loaded.path)
    if keep_ratio is not None:
        loaded.model.set_keep_ratio(keep_ratio)
    runner = prepare_for_inference(loaded.model, amp, compile, fast)
    return Predictor(runner, loaded.categories, image_size, device, loaded.path)


def load_onnx_predictor(
    path: str | Path, image_size: int | None = None, threads: int | None = None, runtime: str = "onnxruntime"
) -> Predictor:
    """An ONNX file written by ``sdetr export`` run on the CPU by ``runtime`` (onnxruntime or openvino), with
    the classes and image size (default the trained one) stored in it; see
    :class:`~sparse_detr.export.OnnxDetector`."""
    detector = OnnxDetector(path, threads=threads, runtime=runtime)
    size = image_size if image_size is not None else detector.image_size
    return Predictor(detector, detector.categories, size, torch.device("cpu"), Path(path))


def image_ids_from_annotations(annotations: str | Path, paths: Sequence[Path]) -> list[int]:
    """The ids a COCO instances file gives ``paths``, matched by file name.

    Raises:
        ValueError: naming an image the file does not list, or a file name it lists twice.
    """
    coco = load_coco_annotations(annotations, bad_boxes="keep")  # only its image ids are used
    ids: dict[str, int] = {}
    for image in coco.dataset["images"]:
        name = Path(image["file_name"]).name
        if name in ids:
            raise InputError(f"{annotations} lists the file name {name} twice: its image ids are ambiguous")
        ids[name] = int(image["id"])
    missing = [path for path in paths if path.name not in ids]
    if missing:
        raise InputError(f"{missing[0]} is not listed in {annotations} ({len(missing)} image(s) not listed)")
    return [ids[path.name] for path in paths]


@dataclass
class Predictions:
    """What :func:`predict_images` has finished: the COCO results of each image that ran (see
    :meth:`Predictor.detections`) and the one-line reason of each that failed. Each image is recorded in one
    step, so an interrupt never leaves half an image."""

    detections: dict[Path, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[Path, str] = field(default_factory=dict)

    @property
    def results(self) -> list[dict[str, Any]]:
        """Every finished image's results, in the order the images ran."""
        return [result for results in self.detections.values() for result in results]

    @property
    def done(self) -> int:
        """Images finished, the failed ones included."""
        return len(self.detections) + len(self.failures)


def predict_images(
    predictor: Predictor,
    paths: Sequence[Path],
    threshold: float = 0.0,
    image_ids: Sequence[int] | None = None,
    track: Callable[[Iterable], Iterable] = iter,
    predictions: Predictions | None = None,
    on_image: Callable[[Path, list[dict[str, Any]]], Any] | None = None,
) -> Predictions:
    """COCO results (see :meth:`Predictor.detections`) of every image, one forward pass each, and the images
    that failed (unreadable, or too small for the model) with a one-line reason each: one bad image costs
    that image only. They go into ``predictions`` (a new one by default) as each image finishes, so what
    finished is kept there when an interrupt stops the loop.

    ``image_ids`` default to 1..N in the order of ``paths``; ``track`` wraps the loop (a progress bar);
    ``on_image(path, results)`` runs before an image is recorded (drawing it), and its InputError fails that
    image.
    """
    image_ids = list(image_ids) if image_ids is not None else list(range(1, len(paths) + 1))
    if len(image_ids) != len(paths):
        raise ValueError(f"got {len(image_ids)} image ids for {len(paths)} images")
    predictions = predictions if predictions is not None else Predictions()
    for path, image_id in track(list(zip(paths, image_ids))):
        try:
            detections = predictor(path, threshold, image_id)
            if on_image is not None:
                on_image(path, detections)
        except InputError as error:
            predictions.failures[path] = str(error) if str(path) in str(error) else f"{path}: {error}"
            continue
        predictions.detections[path] = detections
    return predictions


@dataclass(frozen=True)
class PredictorSettings:
    """Which model ``sdetr predict`` runs and how: ``checkpoint`` (a file, run folder: its best checkpoint, or
    its last with ``last``, or zoo name; default the default run's) on ``device``, or the exported file
    ``onnx`` run by ``runtime`` (default onnxruntime); ``image_size`` (default the trained one),
    ``keep_ratio`` (default the trained ρ), ``amp`` and ``compile`` as in :func:`load_predictor`."""

    checkpoint: str | Path | None = None
    last: bool = False
    onnx: str | Path | None = None
    runtime: str | None = None
    device: str | None = None
    image_size: int | None = None
    keep_ratio: float | None = None
    amp: str | None = None
    compile: bool = False

    def load(self) -> Predictor:
        """The predictor these settings describe.

        Raises:
            UsageError: settings that do not go together (``runtime`` without ``onnx``; ``onnx`` with a
                checkpoint, ``amp`` or ``compile``; a ``keep_ratio`` other than the one fixed at export).
        """
        if self.onnx is None:
            if self.runtime is not None:
                raise UsageError(
                    f"--runtime {self.runtime} runs an exported file: add --onnx FILE (from `sdetr export`)"
                )
            return load_predictor(self.checkpoint, self.device, self.image_size, self.keep_ratio, amp=self.amp,
                                  compile=self.compile, last=self.last)  # fmt: skip
        if self.checkpoint is not None or self.amp is not None or self.compile:
            raise UsageError("--onnx runs the exported file: leave out --checkpoint, --amp and --compile")
        predictor = load_onnx_predictor(self.onnx, self.image_size, runtime=self.runtime or "onnxruntime")
        fixed = predictor.runner.keep_ratio
        if self.keep_ratio is not None and self.keep_ratio != fixed:
            raise UsageError(f"{self.onnx} encodes with keep ratio {fixed:g}, fixed at export")
        return predictor


def _interrupted(predictions: Predictions, paths: Sequence[Path], out: str | Path, exit_code: int) -> Interrupted:
    """Write the detections of the images that finished to ``out`` (none finished: nothing is written) and
    say in one line what was kept and how to go on."""
    if not predictions.done:
        return Interrupted(f"interrupted before the first image finished: nothing was written to {out}", exit_code)
    atomic_write_text(out, json.dumps(predictions.results, indent=1))
    left = [path for path in paths if path not in predictions.detections and path not in predictions.failures]
    failed = f" ({len(predictions.failures)} more failed)" if predictions.failures else ""
    rest = (
        f"the other {len(left)}, from {left[0]} on, were not run: run sdetr predict on them with another --out"
        if left
        else "every image had finished"
    )
    return Interrupted(
        f"interrupted: wrote the detections of {len(predictions.detections)} of {len(paths)} images to {out}"
        f"{failed}; {rest}",
        exit_code,
    )


def predict_files(
    paths: Sequence[Path],
    settings: PredictorSettings,
    out: str | Path,
    threshold: float = 0.3,
    annotations: str | Path | None = None,
    track: Callable[[Iterable], Iterable] = iter,
    on_image: Callable[[Path, list[dict[str, Any]]], Any] | None = None,
) -> Predictions:
    """``sdetr predict``: detect objects in the image files ``paths`` (see :func:`expand_image_paths` for
    folders and patterns) with the model ``settings`` describe and write the COCO results JSON ``out`` (what
    finished, even when some images fail). Image ids come from the instances file ``annotations`` (matched by
    file name), else 1..N. ``on_image(path, results)`` runs as each image finishes (see
    :func:`predict_images`).

    Returns:
        the results of the images that ran and the reason of each that failed.

    Raises:
        Interrupted: Ctrl-C (exit code 130) or SIGTERM (143); the detections of the images that finished
            are written to ``out`` first, and the message says how many and which images were not run.
    """
    check_writable(Path(out).parent)
    image_ids = image_ids_from_annotations(annotations, paths) if annotations is not None else None
    predictions = Predictions()
    try:
        with StopSignals().installed():  # SIGTERM too raises a KeyboardInterrupt, with its exit code
            predictor = settings.load()
            predict_images(predictor, paths, threshold, image_ids, track, predictions, on_image)
    except KeyboardInterrupt as interrupt:
        raise _interrupted(predictions, paths, out, getattr(interrupt, "exit_code", Interrupted.exit_code)) from None
    atomic_write_text(out, json.dumps(predictions.results, indent=1))
    return predictions


def evaluate_onnx(
    path: str | Path,
    settings: EvalSettings = EvalSettings(),
    output_dir: str | Path | None = None,
    runtime: str = "onnxruntime",
    threads: int | None = None,
) -> Metrics:
    """``sdetr eval --onnx``: COCO AP of an exported file run by ``runtime`` on the validation split of
    ``settings.data``, at ``settings.image_size`` (default the one stored in the file), as
    :func:`~sparse_detr.engine.evaluate.evaluate_checkpoint` measures a checkpoint; ``eval_<stem>.json`` and
    ``detections_<stem>.json`` go to ``output_dir`` (default the file's folder).

    Raises:
        UsageError: settings the file fixed at export (keep ratio, model fields, amp, compile), a file that
            ends in post-processing, or a dataset with other categories than the file's (unless
            ``settings.allow_other_categories``).
    """
    path = Path(path)
    if settings.amp or settings.compile or settings.overrides:
        raise UsageError("--onnx runs the exported file: leave out --amp, --compile and [model] settings")
    out = check_writable(output_dir if output_dir is not None else path.parent)
    detector = OnnxDetector(path, runtime=runtime, threads=threads)
    if settings.keep_ratio is not None and settings.keep_ratio != detector.keep_ratio:
        raise UsageError(f"{path} encodes with keep ratio {detector.keep_ratio:g}, fixed at export; "
                         f"export again with --rho {settings.keep_ratio:g}")  # fmt: skip
    if detector.takes_original_sizes:
        raise UsageError(f"{path} ends in post-processing: export it again without --postprocess to evaluate it")
    val_images, val_ann = settings.data.val_split()
    image_size = detector.image_size if settings.image_size is None else settings.image_size
    dataset = CocoDetection(val_images, val_ann, eval_transform(image_size))
    num_classes = int(detector.metadata.get("num_classes", max(detector.categories) + 1))
    check_split_classes(dataset, val_ann, num_classes, detector.categories, path, settings.allow_other_categories)
    loader = build_eval_loader(dataset, settings.batch_size, settings.workers)
    metrics = evaluate(detector, loader, dataset.coco, dataset.label_to_category_id, "cpu",
                       out / f"detections_{path.stem}.json", str(path), progress="evaluating")  # fmt: skip
    extra = {"onnx": str(path), "runtime": runtime, "msda": detector.msda, "keep_ratio": detector.keep_ratio,
             "image_size": image_size}  # fmt: skip
    atomic_write_text(out / f"eval_{path.stem}.json", metrics_json(metrics, **extra))
    return metrics
