"""Where a run's images and annotations come from: a COCO 2017 folder, explicit paths, or the built-in set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sparse_detr.data.coco import resolve_coco_root
from sparse_detr.data.synthetic import MANIFEST_NAME, make_synthetic_dataset, synthetic_splits
from sparse_detr.errors import ConfigError


class DataSplits(NamedTuple):
    """The two COCO-format splits of a run: image folders and instances files."""

    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path


@dataclass(frozen=True)
class DataSource:
    """A dataset folder (``root``: COCO 2017's ``train2017/``, ``val2017/``, ``annotations/``, or a folder
    written by ``sdetr data synth``), or the explicit
    folders and instances files of a custom dataset, or neither: the built-in synthetic dataset.

    Evaluation needs only the validation pair (``val_images``, ``val_ann``); training needs all four.
    """

    root: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None

    def __post_init__(self) -> None:
        explicit = (self.train_images, self.train_ann, self.val_images, self.val_ann)
        if self.root is not None and any(value is not None for value in explicit):
            raise ConfigError("give either a COCO root (--data) or the explicit image folders and instances files")

    @property
    def is_builtin(self) -> bool:
        return self.root is None and self.train_images is None and self.val_images is None

    def splits(self) -> DataSplits:
        """Both splits; the built-in dataset is written to its cache folder on first use.

        Raises:
            ConfigError: explicit paths are incomplete.
            FileNotFoundError: the COCO root lacks a part (named).
        """
        if self.root is not None:
            if (Path(self.root) / MANIFEST_NAME).is_file():
                return DataSplits(*synthetic_splits(self.root))
            return DataSplits(*resolve_coco_root(self.root))
        if self.is_builtin:
            return DataSplits(*synthetic_splits(make_synthetic_dataset()))
        paths = (self.train_images, self.train_ann, self.val_images, self.val_ann)
        if not all(paths):
            raise ConfigError("give all of --train-images --train-ann --val-images --val-ann, or a COCO root --data")
        return DataSplits(*(Path(path) for path in paths))

    def val_split(self) -> tuple[Path, Path]:
        """(validation images folder, instances file): the explicit pair when given, else :meth:`splits`'."""
        if self.val_images is not None or self.val_ann is not None:
            if self.val_images is None or self.val_ann is None:
                raise ConfigError("give both --val-images and --val-ann")
            return Path(self.val_images), Path(self.val_ann)
        splits = self.splits()
        return splits.val_images, splits.val_ann

    def describe(self) -> str:
        if self.root is not None:
            return f"the dataset folder {self.root}"
        if self.is_builtin:
            return "the built-in synthetic dataset"
        return f"{self.train_ann or '-'} / {self.val_ann}"
