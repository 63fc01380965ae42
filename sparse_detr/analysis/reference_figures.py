"""Figures measured on the reference implementation (``shared/official/README.md``) that benchmarks compare to.

GFLOPs: fvcore on one random image in eval mode, the reference's own counting mode. The reference runs the
sparse presets' encoder aux heads at inference too; ``without_aux`` leaves them out (what this project runs),
``with_aux`` is the reference's own total. Figures the reference table does not give are NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from sparse_detr.config import ModelConfig, get_preset, list_presets

NAN = math.nan


class ReferenceGflops(NamedTuple):
    without_aux: float
    with_aux: float


# (backbone, preset, (height, width)) -> GFLOPs of the reference code
REFERENCE_GFLOPS: dict[tuple[str, str, tuple[int, int]], ReferenceGflops] = {
    ("r50", "deformable", (850, 1040)): ReferenceGflops(172.932, NAN),
    ("r50", "deformable", (800, 1066)): ReferenceGflops(166.045, NAN),
    ("r50", "deformable", (800, 1333)): ReferenceGflops(206.550, NAN),
    ("r50", "deformable-topk-bbr", (850, 1040)): ReferenceGflops(177.331, NAN),
    ("r50", "deformable-topk-bbr", (800, 1066)): ReferenceGflops(170.282, NAN),
    ("r50", "deformable-topk-bbr", (800, 1333)): ReferenceGflops(211.765, NAN),
    ("r50", "sparse-rho0.1", (850, 1040)): ReferenceGflops(109.748, 111.189),
    ("r50", "sparse-rho0.1", (800, 1066)): ReferenceGflops(NAN, 106.740),
    ("r50", "sparse-rho0.1", (800, 1333)): ReferenceGflops(NAN, 132.525),
    ("r50", "sparse-rho0.2", (850, 1040)): ReferenceGflops(117.618, 120.500),
    ("r50", "sparse-rho0.2", (800, 1066)): ReferenceGflops(NAN, 115.684),
    ("r50", "sparse-rho0.2", (800, 1333)): ReferenceGflops(NAN, 143.678),
    ("r50", "sparse-rho0.3", (850, 1040)): ReferenceGflops(125.487, 129.811),
    ("r50", "sparse-rho0.3", (800, 1066)): ReferenceGflops(NAN, 124.629),
    ("r50", "sparse-rho0.3", (800, 1333)): ReferenceGflops(NAN, 154.832),
    ("r50", "sparse-rho0.4", (850, 1040)): ReferenceGflops(133.357, 139.122),
    ("r50", "sparse-rho0.4", (800, 1066)): ReferenceGflops(NAN, 133.574),
    ("r50", "sparse-rho0.4", (800, 1333)): ReferenceGflops(NAN, 165.990),
    ("r50", "sparse-rho0.5", (850, 1040)): ReferenceGflops(141.227, 148.433),
    ("r50", "sparse-rho0.5", (800, 1066)): ReferenceGflops(NAN, 142.518),
    ("r50", "sparse-rho0.5", (800, 1333)): ReferenceGflops(NAN, 177.143),
    ("swin-t", "deformable", (850, 1040)): ReferenceGflops(180.398, NAN),
    ("swin-t", "deformable", (800, 1066)): ReferenceGflops(174.111, NAN),
    ("swin-t", "deformable", (800, 1333)): ReferenceGflops(215.399, NAN),
    ("swin-t", "sparse-rho0.1", (850, 1040)): ReferenceGflops(117.214, 118.655),
    ("swin-t", "sparse-rho0.1", (800, 1066)): ReferenceGflops(NAN, 114.806),
    ("swin-t", "sparse-rho0.1", (800, 1333)): ReferenceGflops(NAN, 141.375),
}

# (backbone, preset family) -> parameters as published: trainable, without the encoder aux heads
REFERENCE_PUBLISHED_PARAMS: dict[tuple[str, str], int] = {
    ("r50", "deformable"): 39_847_265,
    ("r50", "deformable-topk-bbr"): 40_827_289,
    ("r50", "sparse"): 40_934_810,
    ("swin-t", "deformable"): 40_308_613,
    ("swin-t", "sparse"): 41_396_158,
}

# fields that do not change the computation at inference
_INFERENCE_NEUTRAL = {"pretrained_backbone": "none", "dropout": 0.0, "aux_loss": True, "backbone_frozen_stages": 0}


def reference_preset(model: ModelConfig, keep_ratio: float) -> str | None:
    """The reference configuration (a preset name) that ``model`` run at ``keep_ratio`` computes, or None."""
    normalized = dataclasses.replace(model, keep_ratio=keep_ratio, **_INFERENCE_NEUTRAL)
    candidates = [f"sparse-rho{keep_ratio:g}"] if keep_ratio > 0 else ["deformable", "deformable-topk-bbr"]
    for name in candidates:
        if name in list_presets() and name != "tiny":
            preset = get_preset(name, model.backbone).model
            if dataclasses.replace(preset, **_INFERENCE_NEUTRAL) == normalized:
                return name
    return None


def reference_gflops(backbone: str, preset: str | None, size: tuple[int, int] | None) -> ReferenceGflops:
    """The reference's GFLOPs of ``preset`` with ``backbone`` at ``size`` (NaN where it has none)."""
    return REFERENCE_GFLOPS.get((backbone, preset, size), ReferenceGflops(NAN, NAN))


def reference_published_params(backbone: str, preset: str | None) -> float:
    """The reference's parameter count as published for ``preset`` (NaN where it has none)."""
    if preset is None:
        return NAN
    family = "sparse" if preset.startswith("sparse-") else preset
    return REFERENCE_PUBLISHED_PARAMS.get((backbone, family), NAN)
