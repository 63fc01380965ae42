"""Augmentation and eval resize: boxes stay inside the image and follow the pixels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from sparse_detr.data import IMAGENET_MEAN, IMAGENET_STD, CropSpec, TransformSizes, build_transforms, scaled_sizes
from sparse_detr.data.transforms import COCO_SCALES, RandomSizeCrop

SMALL = scaled_sizes(64)


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


def _scene(width: int, height: int, rect: tuple[int, int, int, int]) -> tuple[Image.Image, dict]:
    """Black image with one white rectangle (x0, y0, x1, y1) whose box is the only target."""
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    x0, y0, x1, y1 = rect
    pixels[y0:y1, x0:x1] = 255
    boxes = tv_tensors.BoundingBoxes([rect], format="XYXY", canvas_size=(height, width), dtype=torch.float32)
    return Image.fromarray(pixels.numpy()), {"boxes": boxes, "labels": torch.tensor([1])}


@st.composite
def scenes(draw):
    width = draw(st.integers(24, 96))
    height = draw(st.integers(24, 96))
    x0 = draw(st.integers(0, width - 8))
    y0 = draw(st.integers(0, height - 8))
    x1 = draw(st.integers(x0 + 8, width))
    y1 = draw(st.integers(y0 + 8, height))
    return width, height, (x0, y0, x1, y1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes(), seed=st.integers(0, 2**31 - 1), train=st.booleans())
def test_boxes_follow_the_pixels(scene, seed, train):
    """Whatever flip/resize/crop was drawn, the box lies inside the image and frames the white
    rectangle: the extent of the pixels brighter than half matches it to resampling precision."""
    width, height, rect = scene
    image, target = _scene(width, height, rect)
    torch.manual_seed(seed)
    out, out_target = build_transforms(train, **SMALL._asdict())(image, target)
    boxes = out_target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == tuple(out.shape[-2:])
    assert len(boxes) == len(out_target["labels"])
    out_height, out_width = out.shape[-2:]
    assert max(out_height, out_width) <= SMALL.max_size
    white = _unnormalize(out).mean(0) > 0.5
    if len(boxes) == 0:  # cropped away, or left thinner than a pixel
        assert white.sum() <= 2 * (out_height + out_width)
        return
    x0, y0, x1, y1 = boxes[0].tolist()
    assert 0 <= x0 < x1 <= out_width and 0 <= y0 < y1 <= out_height
    if x1 - x0 >= 3 and y1 - y0 >= 3:
        ys, xs = white.nonzero(as_tuple=True)
        extent = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert extent == pytest.approx([x0, y0, x1, y1], abs=1.5)


@settings(max_examples=40, deadline=None)
@given(
    size=st.tuples(st.integers(1, 200), st.integers(1, 200)),
    bounds=st.tuples(st.integers(1, 120), st.integers(0, 80)),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_size_crop_bounds(size, bounds, seed):
    height, width = size
    min_size, extra = bounds
    crop = RandomSizeCrop(min_size, min_size + extra)
    torch.manual_seed(seed)
    out = crop(tv_tensors.Image(torch.zeros(3, height, width)))
    out_height, out_width = out.shape[-2:]
    assert min(min_size, height) <= out_height <= min(min_size + extra, height)
    assert min(min_size, width) <= out_width <= min(min_size + extra, width)


def test_flip_mirrors_boxes():
    image, target = _scene(40, 20, (0, 0, 10, 20))
    out, out_target = v2.Compose([v2.RandomHorizontalFlip(1.0), build_transforms(False, scales=[20])])(image, target)
    assert out_target["boxes"].tolist() == [[30.0, 0.0, 40.0, 20.0]]
    assert _unnormalize(out)[:, :, 30:].min() > 0.99 and _unnormalize(out)[:, :, :30].max() < 0.01


def test_flip_happens_half_the_time():
    image, target = _scene(40, 40, (0, 0, 10, 40))
    transform = build_transforms(True, scales=[40], max_size=100, crop=None)
    torch.manual_seed(0)
    flipped = [transform(image, target)[1]["boxes"][0, 0].item() > 0 for _ in range(200)]
    assert 70 < sum(flipped) < 130


def test_eval_resize():
    image, target = _scene(100, 50, (10, 10, 30, 40))
    out, out_target = build_transforms(False, scales=(48, 64), max_size=1000)(image, target)
    assert out.shape == (3, 64, 128)
    torch.testing.assert_close(out_target["boxes"], torch.tensor([[12.8, 12.8, 38.4, 51.2]]))
    out, _ = build_transforms(False, scales=(48, 64), max_size=100, eval_size=60)(image, target)
    assert out.shape == (3, 50, 100)  # the longer side is capped


def test_train_sizes_come_from_scales():
    image, target = _scene(90, 60, (10, 10, 30, 40))
    transform = build_transforms(True, scales=(32, 48), max_size=1000, crop=(40, 20, 30))  # a plain tuple
    torch.manual_seed(0)
    shorter = {min(transform(image, target)[0].shape[-2:]) for _ in range(60)}
    assert shorter == {32, 48}


def test_crop_branch_can_be_turned_off():
    image, target = _scene(90, 60, (0, 0, 90, 60))
    transform = build_transforms(True, scales=(30,), max_size=1000, crop=None)
    torch.manual_seed(0)
    for _ in range(20):
        out, out_target = transform(image, target)
        assert out.shape == (3, 30, 45)
        assert out_target["boxes"].tolist() == [[0.0, 0.0, 45.0, 30.0]]


def test_scaled_sizes():
    assert scaled_sizes(800) == TransformSizes()
    assert TransformSizes().scales == COCO_SCALES == tuple(range(480, 801, 32))
    sizes = scaled_sizes(160)
    assert sizes.eval_size == 160 and max(sizes.scales) == 160 and min(sizes.scales) == 96
    assert sizes.crop == CropSpec((80, 100, 120), 77, 120)
    assert sizes.max_size == 267
    with pytest.raises(ValueError, match="at least 16"):
        scaled_sizes(8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(10, 5)
    with pytest.raises(ValueError, match="scales"):
        build_transforms(True, scales=())
