"""Training augmentation and evaluation resize of SPEC §6, on torchvision.transforms.v2.

Every pipeline takes ``(image, {"boxes": BoundingBoxes XYXY, "labels": (T,)})`` (PIL or tensor image)
and returns the image as a normalized float tensor (3, H, W) with the boxes moved, clamped and
sanitized to match. Sizes default to the COCO recipe; :func:`scaled_sizes` shrinks it for small images.
Output sizes and the box rule follow the reference implementation (:func:`reference_resize_size`,
:class:`RemoveEmptyBoxes`), so images come out at the same sizes as in the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sparse_detr.errors import ConfigError

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
        raise ConfigError(f"the image size must be at least 16 pixels, got {eval_size}")
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


def reference_resize_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """``(new_height, new_width)`` with the shorter side ``size`` and the longer side at most ``max_size``,
    rounded as the reference implementation does.

    The rule: if the aspect ratio would put the longer side past ``max_size``, ``size`` becomes
    ``round(max_size * shorter / longer)`` (Python's round, half to even; at least 1); an image whose
    shorter side already is ``size`` keeps its size; otherwise the longer side is
    ``floor(size * longer / shorter)``. Rounding the capped size up can put the longer side past
    ``max_size`` by up to half the aspect ratio (90x24 at 64/107 gives 108x29), as in the reference.
    torchvision's ``Resize(size, max_size=...)`` and ``RandomShortestSize`` scale both sides by one
    ratio and can land a pixel lower: a 360x640 (h x w) image at 800/1333 is 749x1333 there and
    750x1333 here.
    """
    shorter, longer = min(height, width), max(height, width)
    if max_size is not None and longer / shorter * size > max_size:
        size = max(1, round(max_size * shorter / longer))
    if shorter == size:
        return height, width
    scaled = int(size * longer / shorter)
    return (size, scaled) if height <= width else (scaled, size)


class ShorterSideResize(v2.Transform):
    """Resize image and boxes so the shorter side is a random choice of ``sizes`` and the longer side
    about at most ``max_size`` (None: unbounded), sized by :func:`reference_resize_size`. With one size it is
    the deterministic evaluation resize."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("sizes must name at least one shorter-side size")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        # a single size draws nothing, so evaluation leaves torch's generator alone
        size = self.sizes[_randint(0, len(self.sizes) - 1)] if len(self.sizes) > 1 else self.sizes[0]
        return {"size": list(reference_resize_size(height, width, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # an explicit (h, w) so boxes follow exactly; bilinear + antialias as torchvision's resizes
        return self._call_kernel(
            F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )


class RemoveEmptyBoxes(v2.Transform):
    """Drop the boxes of zero (or negative) width or height, with their labels: the reference's rule.

    Unlike :class:`~torchvision.transforms.v2.SanitizeBoundingBoxes`, whose minimum is one pixel, boxes
    under a pixel (small objects after downscaling) are kept. Takes ``(image, target)`` with
    ``target["boxes"]`` BoundingBoxes (T, 4), already clamped to the image, and ``target["labels"]`` (T,).
    """

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs if len(inputs) > 1 else inputs[0]
        boxes = target["boxes"]
        xyxy = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        kept = tv_tensors.wrap(boxes.as_subclass(torch.Tensor)[keep], like=boxes)
        return image, {**target, "boxes": kept, "labels": target["labels"][keep]}


class RandomSizeCrop(v2.Transform):
    """Crop a window of random height and width in ``[min_size, max_size]`` (capped by the image) at a
    random position. Boxes are clipped to the window; ones left empty are removed by a later
    :class:`RemoveEmptyBoxes`."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size} and {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
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


def to_model_input() -> v2.Compose:
    """PIL/uint8 image -> float tensor normalized with ImageNet mean/std; boxes clamped to the image
    and the empty ones removed."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ClampBoundingBoxes(),
            RemoveEmptyBoxes(),  # crops leave empty boxes; sub-pixel ones stay, as in the reference
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    """The evaluation pipeline at shorter side ``image_size`` (the COCO recipe's sizes scaled to it)."""
    return build_transforms(False, **scaled_sizes(image_size)._asdict())


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
    ``max_size``. Every resize is a :class:`ShorterSideResize`; both end with :func:`to_model_input`.
    """
    if not scales:
        raise ValueError("scales must name at least one shorter-side size")
    scales = [int(s) for s in scales]
    if not train:
        size = eval_size if eval_size is not None else max(scales)
        return v2.Compose([ShorterSideResize([size], max_size), to_model_input()])

    multi_scale = ShorterSideResize(scales, max_size)
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
                        ShorterSideResize(crop_resize),
                        RandomSizeCrop(crop.min_size, crop.max_size),
                        multi_scale,
                    ]
                ),
            ]
        )
    return v2.Compose([v2.RandomHorizontalFlip(0.5), resize, to_model_input()])
