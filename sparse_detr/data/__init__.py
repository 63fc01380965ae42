"""Datasets, augmentation and batching: COCO-format folders and the built-in synthetic shapes."""

from sparse_detr.data.annotations import AnnotationFileError, category_label_map, load_coco_annotations
from sparse_detr.data.coco import CocoDetection, resolve_coco_root
from sparse_detr.data.collate import collate
from sparse_detr.data.image_io import ImageLoadError, load_rgb_image
from sparse_detr.data.shapes import SHAPE_KINDS, SHAPES
from sparse_detr.data.synthetic import default_dataset_dir, make_synthetic_dataset, synthetic_splits
from sparse_detr.data.transforms import (
    COCO_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSpec,
    TransformSizes,
    build_transforms,
    eval_transform,
    scaled_sizes,
)

__all__ = [
    "COCO_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "SHAPE_KINDS",
    "AnnotationFileError",
    "CocoDetection",
    "CropSpec",
    "ImageLoadError",
    "TransformSizes",
    "build_transforms",
    "eval_transform",
    "category_label_map",
    "collate",
    "default_dataset_dir",
    "load_coco_annotations",
    "load_rgb_image",
    "make_synthetic_dataset",
    "resolve_coco_root",
    "scaled_sizes",
    "synthetic_splits",
]
