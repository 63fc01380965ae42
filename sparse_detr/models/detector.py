"""Deformable DETR / Sparse DETR detector: backbone, input projections, transformer, heads (SPEC §2, §5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparse_detr.config import Config, check_keep_ratio
from sparse_detr.errors import ConfigError
from sparse_detr.models.backbone import build_backbone
from sparse_detr.models.heads import HeadSlots, build_heads
from sparse_detr.models.outputs import DetectorOutputs
from sparse_detr.models.position_encoding import sine_position_encoding
from sparse_detr.models.transformer import DeformableTransformer

if TYPE_CHECKING:
    from sparse_detr.models.backbone_weights import BackboneWeights


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (3, H_i, W_i) images to the largest H and W.

    Returns:
        images (N, 3, H, W) and mask (N, H, W) bool, True on padding.
    """
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for image, padded, image_mask in zip(images, batch, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        image_mask[: image.shape[1], : image.shape[2]] = False
    return batch, mask


def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out_size,) int64 source index of every output index under nearest resizing, computed as
    ``F.interpolate(mode="nearest")`` does (float32 scale in / out, floored, clamped); written out so that
    an exported graph gives the same indices (ONNX Resize rounds ``i / (out / in)`` differently)."""
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / out_size
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().to(torch.int64)
    return index.clamp(max=in_size - 1)


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, H, W) bool padding mask -> (N, h, w), nearest neighbour (the reference's ``F.interpolate``)."""
    rows = _nearest_indices(mask.shape[1], size[0], mask.device)
    cols = _nearest_indices(mask.shape[2], size[1], mask.device)
    return mask[:, rows][:, :, cols]


def _input_projections(in_channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm per backbone map; extra levels: 3x3 stride-2 conv + GroupNorm, the first on
    the raw last backbone map, later ones on the previous projection."""
    projections = [
        nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
        for channels in in_channels
    ]
    channels = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projections.append(
            nn.Sequential(
                nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, hidden_dim),
            )
        )
        channels = hidden_dim
    for projection in projections:
        nn.init.xavier_uniform_(projection[0].weight, gain=1)
        nn.init.zeros_(projection[0].bias)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """One class for every preset; ``config`` decides two-stage queries, box refinement and sparsity.

    Parameter names equal the released checkpoints' (without their alias keys): the heads are
    registered once here as ``class_embed.{i}`` / ``bbox_embed.{i}``, ordered as :attr:`head_slots` says,
    and handed to the transformer.

    The encoder keep ratio ρ can be changed at inference without rebuilding, for every call with
    :meth:`set_keep_ratio` or for one call with ``forward(..., keep_ratio=...)``: any ρ in (0, 1]
    (1.0 encodes every token through the sparse path), or 0 to encode every token without scoring.
    ``config`` keeps the value the model was built with.
    """

    def __init__(
        self, config: Config, backbone: nn.Module | None = None, backbone_weights: BackboneWeights | None = None
    ):
        """``backbone`` replaces the one ``config.model`` describes (for tests with a stand-in); otherwise
        that one is built from ``backbone_weights`` when given, randomly initialized when not."""
        super().__init__()
        self.config = config
        model = config.model
        hidden_dim = model.hidden_dim
        self.transformer = DeformableTransformer(model)
        self.head_slots = HeadSlots.of(model)
        self.class_embed, self.bbox_embed = build_heads(hidden_dim, model.num_classes, self.head_slots)
        if not model.two_stage:
            self.query_embed = nn.Embedding(model.num_queries, 2 * hidden_dim)
        if backbone is None:
            backbone = build_backbone(model, backbone_weights)
        self.input_proj = _input_projections(list(backbone.num_channels), hidden_dim, model.num_feature_levels)
        self.backbone = nn.ModuleList([backbone])

    def set_keep_ratio(self, keep_ratio: float) -> None:
        """Encode ``int(valid_tokens * keep_ratio) + 1`` tokens per image from now on (0: all, no scoring)."""
        keep_ratio = check_keep_ratio(keep_ratio, dense=True)
        if keep_ratio > 0 and not self.transformer.can_sparsify:
            raise ConfigError(f"keep ratio {keep_ratio} needs a token scorer; this model was built without one (ρ 0)")
        self.transformer.keep_ratio = keep_ratio

    @property
    def keep_ratio(self) -> float:
        """The keep ratio forward passes use."""
        return self.transformer.keep_ratio

    def _heads(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The class and box head of each slot of :attr:`head_slots`; a shared pair repeated for every slot."""
        if self.head_slots.shared:
            count = self.head_slots.num_slots
            return [self.class_embed[0]] * count, [self.bbox_embed[0]] * count
        return list(self.class_embed), list(self.bbox_embed)

    def _multiscale_features(self, images: torch.Tensor, mask: torch.Tensor):
        """Projected maps, their padding masks and position encodings, one per level."""
        features = self.backbone[0](images)
        srcs = [projection(feature) for projection, feature in zip(self.input_proj, features)]
        for projection in self.input_proj[len(features) :]:
            srcs.append(projection(features[-1] if len(srcs) == len(features) else srcs[-1]))
        masks = [downsample_mask(mask, src.shape[-2:]) for src in srcs]
        pos = [sine_position_encoding(m, src.shape[1] // 2).to(src.dtype) for m, src in zip(masks, srcs)]
        return srcs, masks, pos

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_aux: bool = False,
        keep_ratio: float | None = None,
    ) -> DetectorOutputs:
        """Detect objects in a padded batch.

        Args:
            images: (N, 3, H, W) normalized images.
            mask: (N, H, W) bool, True on padding; None = no padding.
            return_aux: compute the loss-only outputs (``enc_aux_outputs``, ``backbone_outputs``) in eval
                mode too; training mode always computes them.
            keep_ratio: this call's keep ratio instead of :attr:`keep_ratio`.

        Returns:
            the keys of :class:`~sparse_detr.models.outputs.DetectorOutputs` that this model and call give.
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self._multiscale_features(images, mask)
        class_heads, box_heads = self._heads()
        query_embed = self.query_embed.weight if hasattr(self, "query_embed") else None
        encoded, decoded = self.transformer(
            srcs,
            masks,
            pos,
            class_heads,
            box_heads,
            query_embed,
            keep_ratio,
            with_aux=self.training or return_aux,
        )
        layer_logits, layer_boxes = decoded["layer_logits"], decoded["layer_boxes"]  # (N, D, Q, ...)
        out: DetectorOutputs = {
            "pred_logits": layer_logits[:, -1],
            "pred_boxes": layer_boxes[:, -1],
            "sampling_locations": decoded["sampling_locations"],
            "attention_weights": decoded["attention_weights"],
            **encoded,
        }
        if self.config.model.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": layer_logits[:, i], "pred_boxes": layer_boxes[:, i]}
                for i in range(layer_logits.shape[1] - 1)
            ]
        return out


def build_model(config: Config, backbone_weights: BackboneWeights | None = None) -> DeformableDETR:
    """The detector ``config`` describes, randomly initialized but for the backbone, which starts from
    ``backbone_weights`` when given. ``config.model.pretrained_backbone`` is not read here:
    ``build_model(config, resolve_backbone_weights(config.model))`` starts from the configured pretrained
    backbone (see :mod:`sparse_detr.models.backbone_weights`)."""
    return DeformableDETR(config, backbone_weights=backbone_weights)
