"""What the sparse encoder saw and kept in one image: per-level maps of the scoring network's saliency,
the selected tokens and the decoder attention map (DAM), aligned with the image's pixels.

Alignment: a token (i, j) of a level with stride s covers pixels [s*i, s*(i+1)) x [s*j, s*(j+1)) of the
resized, unpadded image (the backbone's convolutions give ceil(h/s) x ceil(w/s) maps from the image
corner); a displayed pixel maps back to the resized image through its centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparse_detr.config import check_keep_ratio
from sparse_detr.errors import UsageError
from sparse_detr.inference import InputImage, Predictor
from sparse_detr.models import (
    DeformableDETR,
    DetectorOutputs,
    TokenSelection,
    attention_coverage,
    decoder_attention_map,
    fill_padded_tokens,
)


def level_strides(model: DeformableDETR) -> list[int]:
    """Pixels per token of each encoder level: the backbone's strides, then x2 per extra stride-2 level."""
    strides = list(model.backbone[0].strides)
    while len(strides) < model.config.model.num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


def crop_to_image(level_map: torch.Tensor, stride: int, resized_size: tuple[int, int]) -> torch.Tensor:
    """The tokens of a (H_l, W_l) level map that cover pixels of the unpadded (h, w) resized image:
    the top-left (ceil(h / stride), ceil(w / stride)) block."""
    height, width = resized_size
    return level_map[: math.ceil(height / stride), : math.ceil(width / stride)]


def upsample_to_image(
    level_map: np.ndarray,
    stride: int,
    resized_size: tuple[int, int],
    target_size: tuple[int, int],
) -> np.ndarray:
    """Spread a cropped level map over a picture of the whole image at ``target_size`` (H_t, W_t).

    Target pixel (Y, X) shows the token under the resized-image point ((Y + 0.5) h / H_t, (X + 0.5) w / W_t),
    i.e. token (floor(y / stride), floor(x / stride)); nearest, so each token stays one flat block.

    Args:
        level_map: (ceil(h / s), ceil(w / s)), see :func:`crop_to_image`.
        resized_size: (h, w) the model saw. target_size: e.g. the original (height, width).

    Returns:
        (H_t, W_t) array of ``level_map``'s dtype.
    """
    rows = _token_index(target_size[0], resized_size[0], stride, level_map.shape[0])
    cols = _token_index(target_size[1], resized_size[1], stride, level_map.shape[1])
    return level_map[np.ix_(rows, cols)]


def _token_index(target: int, resized: int, stride: int, tokens: int) -> np.ndarray:
    centres = (np.arange(target) + 0.5) * (resized / target)
    return np.minimum((centres // stride).astype(np.int64), tokens - 1)


@dataclass
class TokenView:
    """One image at one keep ratio. Every per-level list holds one (ceil(h/s), ceil(w/s)) array per level,
    cropped to the tokens over the image (see :func:`crop_to_image`).

    ``saliency``: the scoring network's logits. ``selected``: tokens the encoder refined. ``dam``: decoder
    attention mass per token. ``dam_top``: the same number of tokens ranked by the DAM (the scoring
    network's training target). ``kept_per_level`` / ``tokens_per_level`` count the model's selected and
    unpadded tokens per level; ``coverage`` is the share of DAM mass on selected tokens (overall and per
    level), ``overlap`` the share of ``dam_top`` that is selected.
    """

    keep_ratio: float
    strides: list[int]
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    saliency: list[np.ndarray]
    selected: list[np.ndarray]
    dam: list[np.ndarray]
    dam_top: list[np.ndarray]
    kept_per_level: list[int]
    tokens_per_level: list[int]
    coverage: float
    coverage_per_level: list[float]
    overlap: float
    seconds: float

    def on_image(self, level_maps: list[np.ndarray], target_size: tuple[int, int] | None = None) -> list[np.ndarray]:
        """``level_maps`` upsampled to ``target_size`` (default the original image size)."""
        target_size = target_size or self.original_size
        return [
            upsample_to_image(level_map, stride, self.resized_size, target_size)
            for level_map, stride in zip(level_maps, self.strides)
        ]


@torch.no_grad()
def token_view(
    outputs: DetectorOutputs,
    index: int,
    strides: list[int],
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    keep_ratio: float,
    seconds: float = float("nan"),
) -> TokenView:
    """The :class:`TokenView` of image ``index`` of a forward pass with ρ > 0.

    Args:
        outputs: ``DeformableDETR.forward`` outputs with ``token_scores`` and ``selection``.
        resized_size: (h, w) of image ``index`` before the batch padding.
    """
    if "token_scores" not in outputs:
        raise ValueError("these outputs have no token scores: the forward pass ran with keep_ratio 0")
    one = slice(index, index + 1)
    layout, selection = outputs["layout"].image(index), outputs["selection"].image(index)
    dam = decoder_attention_map(outputs["sampling_locations"][one], outputs["attention_weights"][one], layout)
    coverage, coverage_per_level = attention_coverage(dam, selection, layout)
    dam_selection = TokenSelection.top(fill_padded_tokens(dam, layout.padding_mask), selection.counts)
    selected = selection.token_mask(layout.num_tokens)[0]  # (S,)
    dam_top = dam_selection.token_mask(layout.num_tokens)[0]

    def per_level(values: torch.Tensor) -> list[np.ndarray]:
        levels = layout.split_levels(values.detach().float().cpu() if values.is_floating_point() else values.cpu())
        return [crop_to_image(level, stride, resized_size).numpy() for level, stride in zip(levels, strides)]

    return TokenView(
        keep_ratio=keep_ratio,
        strides=strides,
        resized_size=resized_size,
        original_size=original_size,
        saliency=per_level(outputs["token_scores"][index]),
        selected=per_level(selected),
        dam=per_level(dam[0]),
        dam_top=per_level(dam_top),
        kept_per_level=[int(level.sum()) for level in layout.split_levels(selected)],
        tokens_per_level=[int((~level).sum()) for level in layout.split_levels(layout.padding_mask[0])],
        coverage=float(coverage[0]),
        coverage_per_level=[float(value) for value in coverage_per_level[0]],
        overlap=float((selected & dam_top).sum()) / int(dam_top.sum()),
        seconds=seconds,
    )


def require_saliency(predictor: Predictor, keep_ratio: float | None = None) -> float:
    """The keep ratio a saliency view of ``predictor`` runs at (``keep_ratio`` or the trained one).

    Raises:
        UsageError: when the model has no scoring network or the ratio is not in (0, 1].
    """
    model = predictor.model
    if not model.transformer.can_sparsify:
        raise UsageError(
            f"{predictor.checkpoint} has no scoring network (trained with keep_ratio 0), so there is no "
            "saliency to draw; `sdetr predict` gives its detections"
        )
    keep_ratio = model.keep_ratio if keep_ratio is None else keep_ratio
    return check_keep_ratio(keep_ratio, key="--rho")


def explain_image(
    predictor: Predictor, image: InputImage, keep_ratio: float | None = None, threshold: float = 0.3
) -> tuple[TokenView, list[dict]]:
    """One forward pass of ``image`` at ``keep_ratio`` (default the trained ρ): its token view and its
    detections scoring at least ``threshold`` (see :meth:`Predictor.detections`)."""
    keep_ratio = require_saliency(predictor, keep_ratio)
    outputs, seconds = predictor.run([image], keep_ratio=keep_ratio, warm_up=True)
    view = token_view(
        outputs, 0, level_strides(predictor.model), image.resized_size, image.original_size, keep_ratio, seconds
    )
    return view, predictor.detections(outputs, [image], [0], threshold)
