"""Deformable DETR and Sparse DETR: the model, its parts, the criterion and post-processing."""

from sparse_detr.models.attention_map import attention_coverage, decoder_attention_map, fill_padded_tokens
from sparse_detr.models.backbone_weights import (
    BackboneWeights,
    WeightsUnavailableError,
    check_backbone_trainable,
    resolve_backbone_weights,
)
from sparse_detr.models.criterion import SetCriterion, build_criterion, build_weight_dict
from sparse_detr.models.deformable_attention import MSDeformAttn
from sparse_detr.models.detector import DeformableDETR, build_model, pad_images
from sparse_detr.models.fast_inference import InferenceModel, fold_batch_norms, prepare_for_inference
from sparse_detr.models.heads import HeadSlots
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.outputs import Detections, DetectorOutputs
from sparse_detr.models.postprocess import postprocess
from sparse_detr.models.token_layout import TokenLayout, TokenSelection

__all__ = [
    "BackboneWeights",
    "DeformableDETR",
    "Detections",
    "DetectorOutputs",
    "HeadSlots",
    "HungarianMatcher",
    "InferenceModel",
    "MSDeformAttn",
    "SetCriterion",
    "TokenLayout",
    "TokenSelection",
    "WeightsUnavailableError",
    "attention_coverage",
    "build_criterion",
    "build_model",
    "build_weight_dict",
    "check_backbone_trainable",
    "decoder_attention_map",
    "fill_padded_tokens",
    "fold_batch_norms",
    "pad_images",
    "postprocess",
    "prepare_for_inference",
    "resolve_backbone_weights",
]
