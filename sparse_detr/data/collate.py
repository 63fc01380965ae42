"""Batching samples of different sizes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparse_detr.models import pad_images


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]] | None],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]] | None:
    """``[(image (3, H_i, W_i), target), ...]`` -> images (N, 3, H, W) zero-padded to the largest
    height and width, mask (N, H, W) bool True on padding, and the list of targets. Samples that are None
    (images an evaluation set could not read) are left out; a batch of them only is None."""
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    images, targets = zip(*batch)
    images, mask = pad_images(list(images))
    return images, mask, list(targets)
