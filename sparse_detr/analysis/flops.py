"""GFLOPs of a detector with fvcore, in the paper's convention (SPEC §10).

fvcore counts one multiply-add as one FLOP and skips element-wise ops. Two ops of this model need a handle:

- ``sparse_detr::ms_deform_attn`` (the compiled backends): 4 FLOPs per sampled value per channel,
  N·Lq·M·L·P·D·4, which is what fvcore gives the ``grid_sample`` form of the op (the ``pytorch`` backend,
  and the reference implementation's counting mode), so every backend gives the same count.
- ``aten::scaled_dot_product_attention`` (the decoder's self-attention, which asks for no weights): its two
  matrix products, as fvcore counts the ``bmm`` form the reference's ``nn.MultiheadAttention`` takes.

The model is traced once per image, so data-dependent shapes (the kept tokens of the sparse encoder, the
two-stage top-k) are those of that image.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field, fields, is_dataclass
from math import prod

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts a loss with torch.jit on import, which torch now deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from sparse_detr.config import ModelConfig
from sparse_detr.models.detector import DeformableDETR

# The parts of a detector, in the order of its forward pass, as ``FlopCount.by_module`` names them.
PARTS = (
    *("backbone", "input_proj", "scoring_network", "oam_box_head", "enc_output", "encoder", "encoder_aux_heads"),
    *("two_stage_head", "query_init", "decoder", "decoder_class_heads", "decoder_box_heads", "other"),
)
# The parts that only feed training losses: run with ``return_aux``, not at inference.
TRAINING_ONLY_PARTS = ("encoder_aux_heads", "oam_box_head")
# The paper's split of the inference cost: what sparsification can save is the encoder's share.
STAGES = {"backbone": ("backbone",), "encoder": ("scoring_network", "encoder")}  # "rest": everything else


def ms_deform_attn_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle of ``sparse_detr::ms_deform_attn``: value (N, S, M, D), sampling_locations
    (N, Lq, M, L, P, 2) -> N·Lq·M·L·P·D·4 (bilinear sampling: 4 FLOPs per sampled value per channel)."""
    n, _, heads, channels = get_shape(inputs[0])
    _, queries, _, levels, points, _ = get_shape(inputs[3])
    return n * queries * heads * levels * points * channels * 4


def scaled_dot_product_attention_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: query (..., Lq, E), key (..., Lk, E),
    value (..., Lk, Ev) -> (...)·Lq·Lk·(E + Ev), the two matrix products (softmax is element-wise)."""
    query, key, value = (get_shape(tensor) for tensor in inputs[:3])
    return prod(query[:-2]) * query[-2] * key[-2] * (query[-1] + value[-1])


FLOP_HANDLES = {
    "sparse_detr::ms_deform_attn": ms_deform_attn_flop_jit,
    "aten::scaled_dot_product_attention": scaled_dot_product_attention_flop_jit,
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass per image (mean over the images counted).

    Attributes:
        gflops: inference GFLOPs (without the training-only outputs, which inference does not compute).
        gflops_with_aux: GFLOPs with the training-only outputs (the encoder aux heads, as the reference
            runs them at inference too).
        by_module: GFLOPs of the model's parts (``backbone``, ``input_proj``, ``scoring_network``,
            ``enc_output``, ``encoder``, ``two_stage_head``, ``query_init``, ``decoder``,
            ``decoder_class_heads``, ``decoder_box_heads``, the training-only parts, ``other``); they sum to
            ``gflops_with_aux``.
        by_operator: GFLOPs per counted op (fvcore's names: ``conv``, ``linear``, ``grid_sampler``...).
        skipped: ops fvcore does not count (element-wise ones) -> occurrences in one forward pass.
        images: how many images the mean is over.
    """

    gflops: float
    gflops_with_aux: float
    by_module: dict[str, float] = field(default_factory=dict)
    by_operator: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    images: int = 1

    @property
    def by_stage(self) -> dict[str, float]:
        """Inference GFLOPs split as the paper does: ``backbone``, ``encoder`` (with its scoring network)
        and ``rest`` (input projections, two-stage proposals, decoder and heads); they sum to ``gflops``."""
        stages = {stage: sum(self.by_module.get(part, 0.0) for part in parts) for stage, parts in STAGES.items()}
        return {**stages, "rest": self.gflops - sum(stages.values())}


class TraceableDetector(nn.Module):
    """The detector with outputs that tracing takes (tensors and containers of them): the token layout and
    selection become dicts of their tensors. ``return_aux``: also the training-only outputs, so that one trace
    counts both figures of :class:`FlopCount`."""

    def __init__(self, detector: DeformableDETR, return_aux: bool = True):
        super().__init__()
        self.detector = detector
        self.return_aux = return_aux

    def forward(self, images: torch.Tensor) -> dict:
        outputs = self.detector(images, return_aux=self.return_aux)
        return {key: _tensor_fields(value) if is_dataclass(value) else value for key, value in outputs.items()}


def _tensor_fields(value) -> dict[str, torch.Tensor]:
    """A dataclass of tensors as a dict (no copies, unlike ``dataclasses.asdict``)."""
    return {f.name: getattr(value, f.name) for f in fields(value)}


# the part of each prediction head by its role (see ``HeadSlots.role``)
_HEAD_PARTS = {"decoder": "decoder_{kind}_heads", "proposal": "two_stage_head", "encoder_aux": "encoder_aux_heads"}


def _part_names(model: DeformableDETR) -> dict[str, str]:
    """Module name (as fvcore's ``by_module`` keys it) -> part of the model."""
    parts = {
        "backbone": "backbone",
        "input_proj": "input_proj",
        "transformer.enc_mask_predictor": "scoring_network",
        "transformer.oam_class_embed": "scoring_network",
        "transformer.oam_bbox_embed": "oam_box_head",
        "transformer.enc_output": "enc_output",
        "transformer.enc_output_norm": "enc_output",
        "transformer.encoder": "encoder",
        "transformer.pos_trans": "query_init",
        "transformer.pos_trans_norm": "query_init",
        "transformer.reference_points": "query_init",
        "transformer.decoder": "decoder",
    }
    for name, kind in (("class_embed", "class"), ("bbox_embed", "box")):
        for index in range(len(getattr(model, name))):
            parts[f"{name}.{index}"] = _HEAD_PARTS[model.head_slots.role(index)].format(kind=kind)
    present = dict(model.named_modules())
    return {name: part for name, part in parts.items() if name in present}


def _count_one(model: DeformableDETR, images: torch.Tensor) -> tuple[float, Counter, Counter, Counter]:
    """Total FLOPs of ``images`` (N, 3, H, W) in one trace, FLOPs per part and per op, skipped ops."""
    analysis = FlopCountAnalysis(TraceableDetector(model), (images,)).set_op_handle(**FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    total = analysis.total()
    by_module = analysis.by_module()
    parts: Counter = Counter()
    for name, part in _part_names(model).items():
        parts[part] += by_module.get(f"detector.{name}", 0)
    parts["other"] = total - sum(parts.values())
    return total, parts, Counter(analysis.by_operator()), Counter(analysis.unsupported_ops())


def count_flops(model: DeformableDETR, images: torch.Tensor | list[torch.Tensor]) -> FlopCount:
    """fvcore GFLOPs of ``model`` per image, in eval mode without gradients (the model's mode is restored).

    Args:
        model: the detector, at the keep ratio to count.
        images: an (N, 3, H, W) batch, traced once and divided by N; or a list of (3, H, W) images, each
            traced alone (batch 1, no padding), and the mean taken. They are moved to the model's device.
    """
    device = next(model.parameters()).device
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) or a list of (3, H, W), got {tuple(images.shape)}")
        batches, per_batch = [images], images.shape[0]
    else:
        if not images or any(image.dim() != 3 or image.shape[0] != 3 for image in images):
            raise ValueError("images must be a non-empty list of (3, H, W) tensors")
        batches, per_batch = [image[None] for image in images], 1
    was_training = model.training
    model.eval()
    total, parts, operators, skipped = 0.0, Counter(), Counter(), Counter()
    try:
        with torch.no_grad():
            for batch in batches:
                flops, batch_parts, batch_operators, batch_skipped = _count_one(model, batch.to(device))
                total += flops
                parts.update(batch_parts)
                operators.update(batch_operators)
                skipped |= batch_skipped  # the most occurrences over the images
    finally:
        model.train(was_training)
    count = len(batches) * per_batch
    by_module = {part: parts[part] / count / 1e9 for part in PARTS if part in parts}
    with_aux = total / count / 1e9
    training_only = sum(by_module.get(part, 0.0) for part in TRAINING_ONLY_PARTS)
    return FlopCount(
        gflops=with_aux - training_only,
        gflops_with_aux=with_aux,
        by_module=by_module,
        by_operator={op: flops / count / 1e9 for op, flops in operators.items()},
        skipped=dict(sorted(skipped.items())),
        images=count,
    )


def gflops_as_reference(count: FlopCount, config: ModelConfig) -> float:
    """``count.gflops`` as the reference implementation counts the same model: with box refinement its
    decoder computes every layer's box head twice (once to refine the references, once more for the
    outputs), where this model reuses the first result."""
    return count.gflops + (count.by_module.get("decoder_box_heads", 0.0) if config.with_box_refine else 0.0)
