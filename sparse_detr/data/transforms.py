"""Training augmentation and evaluation resize of SPEC §6, on torchvision.transforms.v2.

Every pipeline takes ``(image, {"boxes": BoundingBoxes XYXY, "labels": (T,)})`` (PIL or tensor image)
and returns the image as a normalized float tensor (3, H, W) with the boxes moved, clamped and
sanitized to match. Sizes default to the COCO recipe; :func:`scaled_sizes` shrinks it for small images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_SCALES = tuple(range(480, 801, 32))
COCO_MAX_SIZE = 1333
COCO_EVAL_SIZE = 800


class CropSpec(NamedTuple):
    """The crop branch: resize the shorter side to one of ``resize``, then crop a random
    ``[min_size, max_size]``-sided window (each side drawn independently)."""

    resize: tuple[int, ...] = (400, 500, 600)
    min_size: int = 384
    max_size: int = 600


class TransformSizes(NamedTuple):
    """All sizes of the pipeline; ``build_transforms(train, **sizes._asdict())``."""

    scales: tuple[int, ...] = COCO_SCALES
    max_size: int = COCO_MAX_SIZE
    crop: CropSpec | None = CropSpec()
    eval_size: int = COCO_EVAL_SIZE


def scaled_sizes(eval_size: int) -> TransformSizes:
    """The COCO recipe (shorter side 480..800, eval 800, max 1333, crops 384..600) scaled by
    ``eval_size / 800``, e.g. ``scaled_sizes(160)`` trains at 96..160 px and evaluates at 160."""
    if eval_size < 16:
        raise ValueError(f"eval_size must be at least 16 pixels, got {eval_size}")
    factor = eval_size / COCO_EVAL_SIZE

    def scale(size: int) -> int:
        return max(1, round(size * factor))

    default_crop = CropSpec()
    return TransformSizes(
        scales=tuple(sorted({scale(s) for s in COCO_SCALES})),
        max_size=scale(COCO_MAX_SIZE),
        crop=CropSpec(
            resize=tuple(scale(s) for s in default_crop.resize),
            min_size=scale(default_crop.min_size),
            max_size=scale(default_crop.max_size),
        ),
        eval_size=eval_size,
    )


class RandomSizeCrop(v2.Transform):
    """Crop a window of random height and width in ``[min_size, max_size]`` (capped by the image) at a
    random position. Boxes are clipped to the window; ones left empty are removed by a later
    :class:`~torchvision.transforms.v2.SanitizeBoundingBoxes`."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size} and {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _canvas_size(flat_inputs)
        crop_height = _randint(min(self.min_size, height), min(self.max_size, height))
        crop_width = _randint(min(self.min_size, width), min(self.max_size, width))
        top = _randint(0, height - crop_height)
        left = _randint(0, width - crop_width)
        return {"top": top, "left": left, "height": crop_height, "width": crop_width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from torch's generator (seeded per data-loader worker)."""
    return int(torch.randint(low, high + 1, ()))


def _canvas_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (PIL.Image.Image, tv_tensors.Image)):
            height, width = F.get_size(inpt)
            return height, width
    raise TypeError("RandomSizeCrop needs a PIL image or a tv_tensors.Image among its inputs")


def to_model_input() -> v2.Compose:
    """PIL/uint8 image -> float tensor normalized with ImageNet mean/std; empty boxes removed."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ClampBoundingBoxes(),
            # drops boxes thinner than one pixel: crops leave empty boxes, and downscaling tiny ones
            v2.SanitizeBoundingBoxes(),
        ]
    )


def build_transforms(
    train: bool,
    scales: Sequence[int] = COCO_SCALES,
    max_size: int = COCO_MAX_SIZE,
    crop: CropSpec | tuple | None = CropSpec(),
    eval_size: int | None = None,
) -> v2.Compose:
    """The pipeline of SPEC §6.

    Train: horizontal flip (p 0.5), then with p 0.5 each either resize the shorter side to a random
    choice of ``scales`` (longer side at most ``max_size``), or ``crop`` (resize to one of
    ``crop.resize``, random crop) followed by the same multi-scale resize; ``crop`` may be a plain
    ``(resize, min_size, max_size)`` tuple (``resize`` an int or a tuple), and ``None`` keeps only the
    first branch. Eval: shorter side ``eval_size`` (default ``max(scales)``), longer side at most
    ``max_size``. Both end with :func:`to_model_input`.
    """
    if not scales:
        raise ValueError("scales must name at least one shorter-side size")
    scales = [int(s) for s in scales]
    if not train:
        size = eval_size if eval_size is not None else max(scales)
        return v2.Compose([v2.Resize(size, max_size=max_size), to_model_input()])

    multi_scale = v2.RandomShortestSize(scales, max_size=max_size)
    if crop is None:
        resize = multi_scale
    else:
        crop = CropSpec(*crop)
        crop_resize = [crop.resize] if isinstance(crop.resize, int) else list(crop.resize)
        resize = v2.RandomChoice(
            [
                multi_scale,
                v2.Compose(
                    [
                        v2.RandomShortestSize(crop_resize),
                        RandomSizeCrop(crop.min_size, crop.max_size),
                        multi_scale,
                    ]
                ),
            ]
        )
    return v2.Compose([v2.RandomHorizontalFlip(0.5), resize, to_model_input()])
