"""COCO-format loading: targets, the category rule, batching and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_detr.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnnotationFileError,
    CocoDetection,
    ImageLoadError,
    category_label_map,
    collate,
    load_rgb_image,
    resolve_coco_root,
)

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]


def write_dataset(root: Path, images: list[dict], annotations: list[dict], categories=None) -> tuple[Path, Path]:
    """Write ``images`` (entries with an extra ``color`` or ``mode``) as PNGs plus the JSON; returns
    (images_dir, annotations_file)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image in images:
        image = dict(image)
        color = image.pop("color", (200, 30, 30))
        Image.new("RGB", (image["width"], image["height"]), color).save(images_dir / image["file_name"])
        entries.append(image)
    ann_file = root / "instances.json"
    data = {"images": entries, "annotations": annotations, "categories": categories or CATEGORIES}
    ann_file.write_text(json.dumps(data))
    return images_dir, ann_file


def image_entry(image_id: int, width: int = 40, height: int = 30, **extra) -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height, **extra}


def box(ann_id: int, image_id: int, bbox, category_id: int = 1, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 1.0, **extra}


@pytest.fixture
def small_dataset(tmp_path):
    images = [image_entry(1), image_entry(2), image_entry(3, width=20, height=20)]
    annotations = [
        box(1, 1, [4, 6, 20, 12]),
        box(2, 1, [0, 0, 40, 30], category_id=3, iscrowd=1),
        box(4, 2, [30, 20, 20, 20], category_id=3),  # reaches past the border: clamped
    ]
    return write_dataset(tmp_path, images, annotations)


def test_targets(small_dataset):
    dataset = CocoDetection(*small_dataset)
    assert len(dataset) == 3
    assert dataset.num_classes == 4
    assert dataset.category_names == {1: "cat", 3: "dog"}

    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    expected_red = (200 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert image[0].mean().item() == pytest.approx(expected_red, abs=1e-5)
    # the crowd box is gone
    assert target["labels"].tolist() == [1]
    assert target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[14 / 40, 12 / 30, 20 / 40, 12 / 30]]))
    assert target["boxes"].dtype == torch.float32
    assert target["image_id"].item() == 1 and target["image_id"].dtype == torch.int64
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]

    _, clamped = dataset[1]
    torch.testing.assert_close(clamped["boxes"], torch.tensor([[35 / 40, 25 / 30, 10 / 40, 10 / 30]]))
    assert clamped["labels"].tolist() == [3]

    _, negative = dataset[2]  # kept, with no boxes
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    # the crowd box is still in the ground truth used for evaluation
    assert len(dataset.coco.getAnnIds(imgIds=[1])) == 2


def test_collate_pads_and_masks(small_dataset):
    dataset = CocoDetection(*small_dataset)
    images, mask, targets = collate([dataset[0], dataset[2]])
    assert images.shape == (2, 3, 30, 40) and mask.shape == (2, 30, 40)
    assert not mask[0].any()
    assert mask[1, :20, :20].logical_not().all() and mask[1, 20:].all() and mask[1, :, 20:].all()
    assert images[1, :, 20:].abs().sum() == 0
    assert [t["image_id"].item() for t in targets] == [1, 3]


@pytest.mark.parametrize(
    ("ids", "labels", "num_classes"),
    [
        ([1, 2, 3], [1, 2, 3], 4),  # 1-based: kept
        ([0, 1, 2], [0, 1, 2], 3),  # 0-based: kept
        ([1, 2, 5], [1, 2, 5], 6),  # a few gaps: kept
        ([10, 20, 35], [0, 1, 2], 3),  # sparse: renumbered in id order
        ([7, 3, 1000], [1, 0, 2], 3),
        ([-1, 0, 1], [0, 1, 2], 3),
    ],
)
def test_category_label_rule(ids, labels, num_classes):
    mapping = category_label_map(ids)
    assert [mapping[i] for i in ids] == labels
    assert max(mapping.values()) + 1 == num_classes


def test_coco_keeps_its_91_slots():
    coco_ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    assert len(coco_ids) == 80
    mapping = category_label_map(coco_ids)
    assert all(mapping[i] == i for i in coco_ids)
    assert max(mapping.values()) + 1 == 91


def test_remapped_categories_round_trip(tmp_path):
    categories = [{"id": 100, "name": "a"}, {"id": 7, "name": "b"}, {"id": 42, "name": "c"}]
    annotations = [box(1, 1, [1, 1, 5, 5], category_id=100), box(2, 1, [2, 2, 5, 5], category_id=42)]
    dataset = CocoDetection(*write_dataset(tmp_path, [image_entry(1)], annotations, categories))
    assert dataset.num_classes == 3
    assert dataset.label_to_category_id == {0: 7, 1: 42, 2: 100}
    assert dataset.category_names == {0: "b", 1: "c", 2: "a"}
    _, target = dataset[0]
    assert [dataset.label_to_category_id[label] for label in target["labels"].tolist()] == [100, 42]


def test_missing_paths(tmp_path, small_dataset):
    images_dir, ann_file = small_dataset
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CocoDetection(tmp_path / "nowhere", ann_file)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(images_dir, tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"images": [], "categories": CATEGORIES}), "'annotations' is missing"),
        (json.dumps({"images": {}, "annotations": [], "categories": CATEGORIES}), "'images' is not a list"),
        (
            json.dumps({"images": [{"id": 1}], "annotations": [], "categories": CATEGORIES}),
            r"lack required keys .*file_name",
        ),
        (
            json.dumps({"images": [image_entry(1)], "annotations": [{"image_id": 1}], "categories": CATEGORIES}),
            r"'annotations' entries lack .*category_id",
        ),
        (
            json.dumps({"images": [image_entry(1)], "annotations": [box(1, 1, [1, 2, 3])], "categories": CATEGORIES}),
            "bbox \\[1, 2, 3\\] that is not \\[x, y, width, height\\]",
        ),
        (
            json.dumps(
                {"images": [image_entry(1)], "annotations": [box(1, 1, [1, 2, 3, 4], 9)], "categories": CATEGORIES}
            ),
            r"category ids \[9\] not listed",
        ),
        (json.dumps({"images": [image_entry(1), image_entry(1)], "annotations": [], "categories": CATEGORIES}), "id 1"),
        (json.dumps({"images": [], "annotations": [], "categories": []}), "'categories' is empty"),
    ],
)
def test_not_coco(tmp_path, small_dataset, content, match):
    images_dir, _ = small_dataset
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(AnnotationFileError, match=match) as error:
        CocoDetection(images_dir, bad)
    message = str(error.value)
    assert "bad.json" in message and "\n" not in message


def test_missing_area_and_ids_are_filled(tmp_path):
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 5]}, box(5, 1, [1, 1, 2, 2])]
    dataset = CocoDetection(*write_dataset(tmp_path, [image_entry(1)], annotations))
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[1]))
    assert sorted(a["id"] for a in anns) == [5, 6]
    assert {a["id"]: a["area"] for a in anns}[6] == 20.0


def test_annotations_of_unknown_images_are_ignored(tmp_path):
    annotations = [box(1, 1, [1, 1, 5, 5]), box(2, 99, [1, 1, 5, 5])]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 annotations: 1 of image ids not in 'images' \(e\.g\. 99\)"):
        dataset = CocoDetection(*write_dataset(tmp_path, [image_entry(1)], annotations))
    assert len(dataset.coco.anns) == 1


def test_missing_image_files(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, [image_entry(i) for i in (1, 2, 3)], [box(1, 2, [1, 1, 5, 5])])
    (images_dir / "2.png").unlink()
    for train in (True, False):  # one missing image costs that image, in training and in evaluation
        with pytest.warns(UserWarning, match=r"1 of 3 listed images are not in .*2\.png.*left out"):
            dataset = CocoDetection(images_dir, ann_file, train=train)
        assert dataset.ids == [1, 3]
    for image in ("1.png", "3.png"):
        (images_dir / image).unlink()
    with pytest.raises(FileNotFoundError, match=r"3 of 3 listed images are not in"):
        CocoDetection(images_dir, ann_file)


def test_corrupt_image(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, [image_entry(1), image_entry(2)], [box(1, 2, [1, 1, 5, 5])])
    (images_dir / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageLoadError, match=r"1\.png: cannot read image"):
        CocoDetection(images_dir, ann_file).load_image(0)
    with pytest.warns(UserWarning, match=r"1\.png: cannot read image.*left out of the evaluation"):
        assert CocoDetection(images_dir, ann_file)[0] is None  # collate leaves it out
    dataset = CocoDetection(images_dir, ann_file, train=True)
    with pytest.warns(UserWarning, match=r"1\.png: cannot read image.*another image is used in its place"):
        _, target = dataset[0]
    assert target["image_id"].item() == 2
    assert dataset.failed_images == {1}


def test_size_mismatch_names_the_file(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, [image_entry(1)], [])
    Image.new("RGB", (10, 10)).save(images_dir / "1.png")
    with pytest.raises(ImageLoadError, match=r"1\.png: image is 10x10 but its annotation entry says 40x30"):
        CocoDetection(images_dir, ann_file).load_image(0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    source = Image.new("RGB", (8, 6), (100, 100, 100)).convert(mode)
    if mode == "I;16":
        source = Image.fromarray(np.full((6, 8), 100 * 256, dtype=np.uint16))
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"image{suffix}"
    source.save(path)
    image = load_rgb_image(path, (8, 6))
    assert image.mode == "RGB" and image.size == (8, 6)
    pixels = np.asarray(image, dtype=np.int64)
    if mode == "1":
        assert set(np.unique(pixels)) <= {0, 255}
    else:
        assert np.abs(pixels - 100).max() <= 3, pixels[0, 0]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_rgb_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"


def _exif_rotated(path: Path) -> None:
    """A 40x20 file, left half red, with EXIF orientation 6: displayed as 20x40 (rotated 90 clockwise)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def test_exif_rotation(tmp_path):
    path = tmp_path / "rotated.png"
    _exif_rotated(path)
    displayed = load_rgb_image(path, (20, 40))
    assert displayed.size == (20, 40)
    top = np.asarray(displayed)[:20].reshape(-1, 3)
    assert (top == (255, 0, 0)).all()  # the red left half turned into the top half
    assert load_rgb_image(path).size == (20, 40)
    # annotations made on the raw pixels (the JSON gives the stored size): that frame is used
    assert load_rgb_image(path, (40, 20)).size == (40, 20)


def test_exif_rotation_in_dataset(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, [image_entry(1, width=20, height=40)], [box(1, 1, [0, 0, 20, 20])])
    _exif_rotated(images_dir / "1.png")
    image, target = CocoDetection(images_dir, ann_file)[0]
    assert image.shape == (3, 40, 20)
    assert target["orig_size"].tolist() == [40, 20]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.25, 1.0, 0.5]]))


def test_resolve_coco_root(tmp_path):
    for name in ("train2017", "val2017", "annotations"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json, annotations/instances_val2017.json"):
        resolve_coco_root(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text("{}")
    train_images, train_ann, val_images, val_ann = resolve_coco_root(tmp_path)
    assert train_images == tmp_path / "train2017" and val_ann.name == "instances_val2017.json"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_coco_root(tmp_path / "nope")
