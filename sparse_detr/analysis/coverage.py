"""DAM coverage of a trained model on a dataset: how much of the decoder's attention lands on the tokens
its encoder chose to encode (the quantity Sparse DETR's scoring network is trained to maximize)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sparse_detr.data import collate
from sparse_detr.models import attention_coverage, decoder_attention_map


@torch.no_grad()
def dam_coverage(
    model: nn.Module,
    dataset,
    device: torch.device | str,
    batch_size: int = 1,
    max_images: int | None = None,
    workers: int = 0,
) -> float:
    """Mean over images of the share of the decoder attention map (all layers, heads, queries and points,
    at the model's current keep ratio) that falls on the selected encoder tokens.

    Args:
        model: a ``DeformableDETR``; evaluated in eval mode.
        dataset: ``CocoDetection``-like samples ``(image (3, H, W), target)``, batched with ``collate``
            (batch composition changes the selection, as in evaluation).
        max_images: the first ``max_images`` images only (all when None).

    Returns:
        A share in [0, 1]; NaN when the model encodes every token (no selection to cover).
    """
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model.eval()
    shares = []
    for images, mask, _ in loader:
        outputs = model(images.to(device), mask.to(device))
        if "selection" not in outputs:
            return math.nan
        layout = outputs["layout"]
        attention_map = decoder_attention_map(outputs["sampling_locations"], outputs["attention_weights"], layout)
        overall, _ = attention_coverage(attention_map, outputs["selection"], layout)  # (N,)
        shares.append(overall.float().cpu())
    return float(torch.cat(shares).mean()) if shares else math.nan
