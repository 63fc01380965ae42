"""Backbones (SPEC §1): a timm ResNet with frozen BatchNorm, or Swin-T, giving the maps at strides 8/16/32.

Each backbone keeps its weights under ``body`` (``backbone.0.body.*`` in the detector, as in the released
checkpoints) and has ``num_channels`` / ``strides`` for its three outputs. ResNet names equal the
torchvision/official ones; Swin-T uses timm's modules, whose layout differs from the official (Microsoft)
one only in where the patch merging sits: :func:`swin_from_official` converts.

:func:`build_backbone` initializes randomly and loads a weights file when given one; which file a run starts
from is decided (and fetched) by :mod:`sparse_detr.models.backbone_weights`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from sparse_detr.config import ModelConfig
from sparse_detr.errors import CheckpointError, ConfigError
from sparse_detr.utils.state_dict import load_state_dict_strict

if TYPE_CHECKING:
    from sparse_detr.models.backbone_weights import BackboneWeights

SWIN_T = "swin-t"
# our backbone names -> timm's; other names are timm ResNets
TIMM_NAMES = {"r50": "resnet50", SWIN_T: "swin_tiny_patch4_window7_224"}
# BatchNorm2d batch counters: absent from frozen BN and from some weight files, never worth loading
BATCH_COUNTER = "num_batches_tracked"
# SCRL's encoder is nn.Sequential(conv1, bn1, relu, maxpool, layer1, .., layer4) of a torchvision ResNet
SCRL_ENCODER = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def timm_model_name(backbone: str) -> str:
    """The timm model behind ``backbone`` (``r50``, ``swin-t`` or a timm ResNet name such as ``resnet18``)."""
    if backbone in TIMM_NAMES:
        return TIMM_NAMES[backbone]
    if backbone.startswith("resnet"):
        return backbone
    raise ConfigError(f"unknown backbone {backbone!r}: use 'r50', 'swin-t' or a timm ResNet name")


class ResNetBackbone(nn.Module):
    """timm ResNet (``features_only``) returning layer2..4.

    The reference setting (``norm="frozen_bn"``, ``frozen_stages=2``) freezes BatchNorm and the stem and
    layer1, which presumes ImageNet weights. Learning from scratch needs ``norm="batch_norm"``: frozen
    statistics of a random init leave timm's zero-initialized last BN of each block at zero, so every
    residual branch would stay switched off.
    """

    STAGES = ("conv1.", "layer1.", "layer2.", "layer3.", "layer4.")  # stem (conv1 + bn1) first

    def __init__(self, name: str = "resnet50", norm: str = "frozen_bn", frozen_stages: int = 2):
        super().__init__()
        body = timm.create_model(name, features_only=True, out_indices=(2, 3, 4))
        self.body = freeze_batch_norm_2d(body) if norm == "frozen_bn" else body
        frozen = tuple(self.STAGES[:frozen_stages]) + (("bn1.",) if frozen_stages else ())
        for param_name, param in self.body.named_parameters():
            param.requires_grad_(not param_name.startswith(frozen))
        self.num_channels: list[int] = self.body.feature_info.channels()
        self.strides: list[int] = self.body.feature_info.reduction()

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) -> maps (N, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉) for strides s = 8, 16, 32."""
        return self.body(images)

    def adapt_pretrained(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision, timm or SCRL ResNet weights -> body keys: the classifier is dropped and BN batch
        counters are the body's own."""
        if any(key.startswith("encoder.") for key in state_dict):
            state_dict = resnet_from_scrl(state_dict)
        adapted = {
            key: value
            for key, value in state_dict.items()
            if not key.startswith("fc.") and not key.endswith(BATCH_COUNTER)
        }
        adapted.update({key: value for key, value in self.body.state_dict().items() if key.endswith(BATCH_COUNTER)})
        return adapted


def resnet_from_scrl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SCRL's online network (``encoder.{0,1,4..7}.*``) -> ResNet keys (``conv1``, ``bn1``, ``layer1..4``);
    the projector, predictor and any other non-encoder entries are dropped."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            index, _, rest = key.removeprefix("encoder.").partition(".")
            # an unknown index keeps its key, so strict loading reports it
            converted[f"{SCRL_ENCODER[index]}.{rest}" if index in SCRL_ENCODER else key] = value
    return converted


class SwinBody(nn.Module):
    """Swin-T's patch embedding and four stages (timm modules: a stage opens with its patch merging) plus
    one LayerNorm per output stage (``norm1``..``norm3``), for inputs of any size.

    The forward pads like the reference: images to a multiple of the patch size, and inside every block
    the normalized map to a multiple of the window *before* the cyclic shift, the padding taking part in
    attention. timm's own dynamic-size forward shifts before padding, so it gives other numbers on sizes
    that are not window multiples.
    """

    def __init__(self, swin: nn.Module):
        super().__init__()
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.patch_size: tuple[int, int] = swin.patch_embed.patch_size
        self.num_channels = [stage.blocks[0].dim for stage in self.layers][1:]
        for index, channels in enumerate(self.num_channels, start=1):
            self.add_module(f"norm{index}", nn.LayerNorm(channels))

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) -> outputs of stages 2..4, each (N, C_i, H_i, W_i) after its LayerNorm."""
        patch_h, patch_w = self.patch_size
        height, width = images.shape[-2:]
        x = self.patch_embed(F.pad(images, (0, (-width) % patch_w, 0, (-height) % patch_h)))  # (N, H/4, W/4, C)
        outputs = []
        for index, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = _swin_block(block, x)
            if index > 0:
                norm = getattr(self, f"norm{index}")
                outputs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outputs


def _swin_block(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """One (shifted) window attention block with the reference's padding; x (N, H, W, C) -> same shape."""
    _, height, width, channels = x.shape
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    shortcut = x
    x = F.pad(block.norm1(x), (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
    padded_h, padded_w = x.shape[1:3]
    attn_mask = None
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        # (windows, win_h·win_w, win_h·win_w): -100 between tokens that the roll brought together
        attn_mask = block.get_attn_mask(x)
    windows = window_partition(x, block.window_size).view(-1, win_h * win_w, channels)
    windows = block.attn(windows, mask=attn_mask)
    x = window_reverse(windows.view(-1, win_h, win_w, channels), block.window_size, padded_h, padded_w)
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    x = shortcut + block.drop_path1(x[:, :height, :width])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(nn.Module):
    """Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, drop-path 0.2) returning stages 2..4.

    The first ``frozen_stages`` of [patch embedding, stage 1, .., stage 4] do not train, a stage with the
    patch merging that follows it as in the official layout: the default 2 freezes the patch embedding and
    stage 1, like the reference's ``frozen_stages=2``. The output norms always train.
    """

    def __init__(self, frozen_stages: int = 2):
        super().__init__()
        swin = timm.create_model(
            TIMM_NAMES[SWIN_T],
            drop_path_rate=0.2,
            strict_img_size=False,
            always_partition=True,  # the reference keeps 7x7 windows (and shifts) on maps smaller than that
        )
        self.body = SwinBody(swin)
        # a plain list: the modules stay registered once, under body (the checkpoint layout)
        self.frozen_modules = [module for stage in self.stages()[:frozen_stages] for module in stage]
        for module in self.frozen_modules:
            module.requires_grad_(False)
        self.num_channels: list[int] = self.body.num_channels
        self.strides = [8, 16, 32]

    def train(self, mode: bool = True) -> SwinBackbone:
        """Frozen stages stay in eval mode, as in the reference: no drop-path where nothing trains."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def stages(self) -> list[list[nn.Module]]:
        """The modules of the patch embedding and of each stage (its blocks and the patch merging after them,
        which timm places at the start of the next stage), in order."""
        layers = self.body.layers
        stages = [[self.body.patch_embed]]
        for index, layer in enumerate(layers):
            stages.append([layer.blocks, *(following.downsample for following in layers[index + 1 : index + 2])])
        return stages

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) -> maps (N, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉) for strides s = 8, 16, 32."""
        return self.body(images)

    def adapt_pretrained(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """ImageNet Swin weights (official or timm layout) -> body keys. The classifier and final norm
        are dropped; the output norms, absent from classification weights, keep their initialization."""
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(("head.", "norm."))}
        if is_official_swin(state_dict):
            state_dict = swin_from_official(state_dict)
        own = self.body.state_dict()
        for key in own:
            if re.fullmatch(r"norm\d\.(weight|bias)", key):
                state_dict.setdefault(key, own[key])
        return state_dict


def is_official_swin(state_dict: Mapping[str, Tensor]) -> bool:
    """The official layout has a patch merging at the end of stage 1 (``layers.0.downsample``)."""
    return any(key.startswith("layers.0.downsample.") for key in state_dict)


def swin_from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (Microsoft) Swin body keys -> timm's: the patch merging closing stage i opens stage i+1.

    ``relative_position_index`` buffers are checked against the window's index and dropped (timm does not
    store them), shift masks (``attn_mask``) are dropped (they depend on the input size and are rebuilt
    on every forward).
    """
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("attn_mask"):
            continue
        if key.endswith("relative_position_index"):
            window = round(value.shape[0] ** 0.5)
            if not torch.equal(value, get_relative_position_index(window, window)):
                raise CheckpointError(f"{key} is not the relative position index of a {window}x{window} window")
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
        converted[key] = value
    return converted


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path``: a ``.safetensors`` file, or a torch file (tensors only: ``weights_only``
    unpickling) unwrapped from a ``model``, ``state_dict`` or SCRL ``online_network_state_dict`` entry."""
    if Path(path).suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    content = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "online_network_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict")
    return content


def build_backbone(model_config: ModelConfig, weights: BackboneWeights | None = None) -> nn.Module:
    """The backbone ``model_config.backbone`` names (``r50``, ``swin-t`` or a timm ResNet such as
    ``resnet18``), randomly initialized, then loaded from ``weights.file`` when given (strictly: only
    classifier heads, final norms and BN batch counters are ignored). Nothing is downloaded here: see
    :func:`sparse_detr.models.backbone_weights.resolve_backbone_weights`."""
    name = timm_model_name(model_config.backbone)
    if model_config.backbone == SWIN_T:
        backbone = SwinBackbone(model_config.backbone_frozen_stages)
    else:
        backbone = ResNetBackbone(
            name, norm=model_config.backbone_norm, frozen_stages=model_config.backbone_frozen_stages
        )
    if weights is not None:
        state_dict = backbone.adapt_pretrained(read_weights(weights.file))
        load_state_dict_strict(backbone.body, state_dict, f"backbone weights {weights.file}")
    return backbone
