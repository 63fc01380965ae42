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
from sparse_detr.data.transforms import (
    COCO_SCALES,
    RandomSizeCrop,
    ShorterSideResize,
    reference_resize_size,
    to_model_input,
)

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
    # the reference rule rounds the capped shorter side to the nearest pixel, so the longer side may pass
    # max_size by up to half the aspect ratio (see the (90, 24, 64, 107) row of REFERENCE_SIZES)
    longer, shorter = max(out_height, out_width), min(out_height, out_width)
    assert longer <= SMALL.max_size + (longer + 1) / (2 * shorter)
    white = _unnormalize(out).mean(0) > 0.5
    if len(boxes) == 0:  # cropped away (boxes under a pixel are kept)
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


# (height, width, size, max_size) -> (new_height, new_width), each worked out by hand with the reference's
# rule: if longer / shorter * size > max_size then size = round(max_size * shorter / longer); a shorter side
# equal to size keeps the image; else shorter = size, longer = floor(size * longer / shorter).
REFERENCE_SIZES = [
    ((360, 640, 800, 1333), (750, 1333)),  # 1422 > 1333: size round(749.81) = 750, longer floor(1333.3)
    ((640, 360, 800, 1333), (1333, 750)),  # the same, portrait
    ((500, 500, 800, 1333), (800, 800)),  # square
    ((480, 640, 800, 1333), (800, 1066)),  # uncapped: floor(1066.7)
    ((640, 480, 800, 1333), (1066, 800)),
    ((800, 1000, 800, 1333), (800, 1000)),  # shorter side already 800: kept
    ((400, 1333, 800, 1333), (400, 1333)),  # capped to round(400.0) = 400, which it already is: kept
    ((3, 2, 800, 1333), (1200, 800)),  # tiny image, upscaled
    ((1, 1, 16, None), (16, 16)),  # no cap
    ((360, 640, 800, None), (800, 1422)),
    ((10, 1000, 800, 1333), (13, 1300)),  # extreme: size round(13.33) = 13, longer 1300
    ((2000, 20, 128, 213), (200, 2)),  # extreme portrait: size round(2.13) = 2
    ((90, 24, 64, 107), (108, 29)),  # size round(28.53) = 29, longer floor(108.75): one past max_size
    ((1, 2, 3, 5), (2, 4)),  # round(2.5) = 2: half to even, as Python's round
    # the tiny preset (scaled_sizes(128): scales 77..128, max 213, crop resizes 64..96)
    ((120, 160, 128, 213), (128, 170)),  # floor(170.7)
    ((96, 160, 128, 213), (128, 213)),  # 213.3 > 213: size round(127.8) = 128, longer floor(213.3)
    ((120, 160, 77, 213), (77, 102)),
    ((96, 160, 80, None), (80, 133)),
]


@pytest.mark.parametrize(("args", "expected"), REFERENCE_SIZES)
def test_reference_resize_size(args, expected):
    assert reference_resize_size(*args) == expected


def test_eval_resize_rounds_like_the_reference():
    """torchvision's Resize(800, max_size=1333) makes a 640x360 image 749x1333; the reference 750x1333."""
    image, target = _scene(640, 360, (0, 0, 640, 360))
    state = torch.get_rng_state()
    out, out_target = build_transforms(False)(image, target)
    assert out.shape == (3, 750, 1333)
    assert out_target["boxes"].tolist() == [[0.0, 0.0, 1333.0, 750.0]]
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws no random numbers


def test_train_resizes_round_like_the_reference():
    """Both branches size by the reference rule (torchvision's rounding would give 127x213 here).
    A 96x160 image: plain branch 128x213 (see the table); crop branch resizes to 80x133 (table), keeps it
    whole (the window is capped by the image), then 133 / 80 * 128 = 212.8 <= 213 gives 128x212."""
    image, target = _scene(160, 96, (10, 10, 30, 40))
    transform = build_transforms(True, scales=(128,), max_size=213, crop=CropSpec((80,), 1000, 1000))
    torch.manual_seed(0)
    shapes = {tuple(transform(image, target)[0].shape[-2:]) for _ in range(30)}
    assert shapes == {(128, 213), (128, 212)}


def test_shorter_side_resize_draws_from_sizes():
    image = tv_tensors.Image(torch.zeros(3, 96, 160))
    resize = ShorterSideResize((64, 80, 96), max_size=None)
    torch.manual_seed(0)
    shapes = {tuple(resize(image).shape[-2:]) for _ in range(60)}
    assert shapes == {(64, 106), (80, 133), (96, 160)}


def test_sub_pixel_boxes_are_kept_and_empty_ones_removed():
    """The reference keeps every box of positive width and height, however thin; torchvision's
    SanitizeBoundingBoxes would also drop the half-pixel one."""
    image = Image.new("RGB", (40, 40))
    boxes = [[5.0, 5.0, 5.5, 20.0], [0.0, 0.0, 10.0, 10.0], [30.0, 0.0, 40.0, 10.0], [12.0, 12.0, 28.0, 12.0]]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(40, 40)),
        "labels": torch.tensor([1, 2, 3, 4]),
    }
    out, out_target = to_model_input()(image, target)
    assert out_target["boxes"].tolist() == boxes[:3] and out_target["labels"].tolist() == [1, 2, 3]
    assert isinstance(out_target["boxes"], tv_tensors.BoundingBoxes)

    # a centre crop to the window [10, 30) x [10, 30): the box right of it is cut to zero width and goes
    # with its label; the one overlapping the window is clipped and the half-pixel one moved
    crossing = [[5.0, 15.0, 15.0, 25.0], [30.0, 0.0, 40.0, 10.0], [10.2, 12.0, 10.7, 20.0]]
    target = {
        "boxes": tv_tensors.BoundingBoxes(crossing, format="XYXY", canvas_size=(40, 40)),
        "labels": torch.tensor([1, 2, 3]),
    }
    out, out_target = v2.Compose([v2.CenterCrop(20), to_model_input()])(image, target)
    assert out.shape == (3, 20, 20) and out_target["labels"].tolist() == [1, 3]
    expected = torch.tensor([[0.0, 5.0, 5.0, 15.0], [0.2, 2.0, 0.7, 10.0]])
    torch.testing.assert_close(out_target["boxes"].as_subclass(torch.Tensor), expected)


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
