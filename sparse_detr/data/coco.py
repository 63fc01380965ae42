"""COCO-format detection datasets: an images folder plus an instances JSON."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from sparse_detr.data.annotations import category_label_map, load_coco_annotations
from sparse_detr.data.image_io import ImageLoadError, load_rgb_image
from sparse_detr.data.transforms import to_model_input
from sparse_detr.errors import MissingFileError


class CocoDetection(Dataset):
    """Images and box targets of a COCO instances file.

    ``dataset[i]`` is ``(image, target)``: image (3, H, W) float, normalized with ImageNet mean/std;
    target ``labels`` (T,) int64, ``boxes`` (T, 4) float32 normalized cxcywh in the transformed image,
    ``image_id`` () int64, ``orig_size`` (2,) int64 (h, w) of the file, ``size`` (2,) int64 (h, w) after
    ``transforms``. Crowd boxes are left out of the targets (as in the reference, they stay in ``coco``
    for evaluation), boxes left empty by clamping to the image are dropped, images without boxes are kept
    as negatives.

    ``transforms(image, {"boxes": BoundingBoxes XYXY, "labels"})`` must return a normalized tensor
    image, like :func:`~sparse_detr.data.transforms.build_transforms`; by default the image is only
    normalized.

    Bad input costs what it touches, with a warning that counts and names it: the annotation file is
    checked when the dataset is built (:func:`~sparse_detr.data.annotations.load_coco_annotations`; with
    ``train`` bad boxes are dropped, otherwise they are an error, as AP would be wrong), and missing image
    files are left out. An image that fails to load later is, with ``train``, replaced by the next image;
    otherwise ``dataset[i]`` is None (:func:`~sparse_detr.data.collate.collate` leaves it out, and
    evaluation scores the images it saw).

    Attributes:
        coco: the pycocotools index of the annotations file (ground truth for COCOeval).
        num_classes: what ``ModelConfig.num_classes`` must be (largest label + 1).
        label_to_category_id / category_names: label -> category id / name (see
            :func:`~sparse_detr.data.annotations.category_label_map` for the rule).
        ids: the image ids served, in order.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_file: str | Path,
        transforms: Callable[..., Any] | None = None,
        train: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise MissingFileError(f"images folder {self.images_dir} does not exist")
        self.annotations_file = Path(annotations_file)
        self.coco = load_coco_annotations(self.annotations_file, bad_boxes="drop" if train else "error")
        self.transforms = transforms if transforms is not None else to_model_input()
        self.train = train

        category_to_label = category_label_map(self.coco.cats)
        self.category_to_label = category_to_label
        self.label_to_category_id = {label: cid for cid, label in category_to_label.items()}
        self.category_names = {category_to_label[cid]: cat["name"] for cid, cat in self.coco.cats.items()}
        self.num_classes = max(category_to_label.values()) + 1

        self.ids = self._present_image_ids(sorted(self.coco.imgs))
        self.failed_images: set[int] = set()

    def _present_image_ids(self, ids: list[int]) -> list[int]:
        missing = [i for i in ids if not (self.images_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if not missing:
            return ids
        example = self.images_dir / self.coco.imgs[missing[0]]["file_name"]
        message = (
            f"{self.annotations_file}: {len(missing)} of {len(ids)} listed images are not in {self.images_dir} "
            f"(e.g. {example})"
        )
        absent = set(missing)
        kept = [i for i in ids if i not in absent]
        if not kept:
            raise MissingFileError(message)
        warnings.warn(f"{message}; left out", stacklevel=3)
        return kept

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load_image(self, index: int):
        """The RGB PIL image of ``index``, in the frame of its annotations."""
        info = self.coco.imgs[self.ids[index]]
        expected = (info["width"], info["height"]) if "width" in info and "height" in info else None
        return load_rgb_image(self.image_path(index), expected)

    def load_boxes(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-crowd boxes of ``index`` clamped to the image, XYXY pixels (T, 4), and their labels (T,)."""
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(self.ids[index], []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(self.category_to_label[ann["category_id"]])
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[keep]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                image = self.load_image(current)
            except ImageLoadError as error:
                if self.ids[current] not in self.failed_images:
                    instead = "another image is used in its place" if self.train else "left out of the evaluation"
                    warnings.warn(f"{error}; {instead}", stacklevel=2)
                    self.failed_images.add(self.ids[current])
                if not self.train:
                    return None
                continue
            return self._sample(current, image)
        raise ImageLoadError(f"{self.images_dir}: none of the {len(self)} images could be read")

    def _sample(self, index: int, image) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        width, height = image.size
        boxes, labels = self.load_boxes(index, width, height)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
        }
        image, target = self.transforms(image, target)
        if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point()):
            raise TypeError("transforms must return a normalized float (3, H, W) image; see build_transforms")
        new_height, new_width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([new_width, new_height, new_width, new_height], dtype=torch.float32)
        return image.as_subclass(torch.Tensor), {
            "labels": target["labels"].as_subclass(torch.Tensor),
            "boxes": boxes.as_subclass(torch.Tensor).float() / scale,
            "image_id": torch.tensor(self.ids[index], dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([new_height, new_width], dtype=torch.int64),
        }


def resolve_coco_root(path: str | Path) -> tuple[Path, Path, Path, Path]:
    """``(train_images, train_ann, val_images, val_ann)`` of a COCO 2017 folder: ``train2017/``,
    ``val2017/``, ``annotations/instances_{train,val}2017.json``. Raises FileNotFoundError naming
    what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"dataset folder {root} does not exist")
    parts = (
        root / "train2017",
        root / "annotations" / "instances_train2017.json",
        root / "val2017",
        root / "annotations" / "instances_val2017.json",
    )
    missing = [str(p.relative_to(root)) for p in parts if not p.exists()]
    if missing:
        raise MissingFileError(
            f"{root} is not a COCO 2017 folder: missing {', '.join(missing)} "
            f"(or give --train-images/--train-ann/--val-images/--val-ann)"
        )
    return parts
