"""Backbones: official parameter layout, freezing, any input size, Swin-T numerics (weight files: see
test_backbone_weights.py)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_detr.config import ModelConfig
from sparse_detr.models.backbone import build_backbone, swin_from_official

OFFICIAL = Path(__file__).resolve().parent / "data" / "official"
SWIN_DEPTHS = (2, 2, 6, 2)
SWIN_HEADS = (3, 6, 12, 24)


def official_body_keys(config_name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``backbone.0.body.*`` entries of an official keys file: name -> (shape, dtype)."""
    entries = {}
    for line in (OFFICIAL / f"keys_{config_name}.txt").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        if name.startswith("backbone.0.body."):
            entries[name.removeprefix("backbone.0.body.")] = (
                tuple(int(s) for s in re.findall(r"\d+", shape)),
                dtype,
            )
    return entries


def layout(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {key: (tuple(value.shape), str(value.dtype).removeprefix("torch.")) for key, value in state_dict.items()}


def swin_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm body keys -> official ones (the inverse of ``swin_from_official``), with the index buffers."""
    from timm.models.swin_transformer import get_relative_position_index

    official = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        official[key] = value
        if key.endswith("relative_position_bias_table"):
            official[key.replace("bias_table", "index")] = get_relative_position_index(7, 7)
    return official


def frozen_parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if not p.requires_grad)


@pytest.fixture(scope="module")
def r50():
    return build_backbone(ModelConfig(backbone="r50"))


@pytest.fixture(scope="module")
def swin():
    return build_backbone(ModelConfig(backbone="swin-t"))


def test_r50_body_has_the_official_layout(r50):
    assert layout(r50.body.state_dict()) == official_body_keys("r50_sparse_detr_rho_0.1")
    # stem + layer1 convolutions; frozen BN statistics are buffers (official README: 222,400 frozen)
    assert frozen_parameter_count(r50) == 222_400
    trainable = {name.split(".")[0] for name, p in r50.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


@pytest.mark.parametrize(("name", "channels"), [("r50", [512, 1024, 2048]), ("resnet18", [128, 256, 512])])
def test_resnet_outputs_at_strides_8_16_32(name, channels, r50):
    backbone = r50 if name == "r50" else build_backbone(ModelConfig(backbone=name))
    assert backbone.num_channels == channels and backbone.strides == [8, 16, 32]
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 37, 53))
    assert [tuple(m.shape) for m in maps] == [
        (2, c, math.ceil(37 / s), math.ceil(53 / s)) for c, s in zip(channels, [8, 16, 32], strict=True)
    ]


def test_swin_body_corresponds_to_the_official_layout(swin):
    official = official_body_keys("swint_sparse_detr_rho_0.1")
    tensors = {key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, (shape, dtype) in official.items()}
    for key, value in swin_to_official(swin.body.state_dict()).items():
        if key.endswith("relative_position_index"):
            tensors[key] = value
    assert layout(swin_from_official(tensors)) == layout(swin.body.state_dict())
    assert layout(swin_to_official(swin.body.state_dict())) == official
    # patch embedding, stage-1 blocks and the patch merging that closes stage 1 (official README: 304,086)
    assert frozen_parameter_count(swin) == 304_086
    assert swin.num_channels == [192, 384, 768] and swin.strides == [8, 16, 32]


def test_swin_rejects_a_wrong_relative_position_index(swin):
    official = swin_to_official(swin.body.state_dict())
    key = "layers.2.blocks.3.attn.relative_position_index"
    official[key] = official[key].flip(0)
    with pytest.raises(ValueError, match=re.escape(key)):
        swin_from_official(official)


# --- an independent Swin-T forward on the official layout, written from the paper and SPEC §1 ---


def _layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def _windows(x, size):
    """(N, H, W, C) -> (N·windows, size², C), windows in row-major order."""
    n, h, w, c = x.shape
    return x.reshape(n, h // size, size, w // size, size, c).transpose(2, 3).reshape(-1, size * size, c)


def _reference_block(x, state, prefix, heads, shift, window=7):
    n, h, w, c = x.shape
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    y = F.pad(_layer_norm(x, state, f"{prefix}.norm1"), (0, 0, 0, wp - w, 0, hp - h))
    y = torch.roll(y, (-shift, -shift), (1, 2))
    qkv = F.linear(_windows(y, window), state[f"{prefix}.attn.qkv.weight"], state[f"{prefix}.attn.qkv.bias"])
    q, k, v = qkv.reshape(qkv.shape[0], window * window, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    table = state[f"{prefix}.attn.relative_position_bias_table"]
    bias = table[state[f"{prefix}.attn.relative_position_index"]].permute(2, 0, 1)  # (heads, 49, 49)
    logits = (q * (c // heads) ** -0.5) @ k.transpose(-1, -2) + bias
    if shift:
        # regions of the shifted padded grid: rows/cols before the last window, inside it before the
        # wrapped-around part, and the wrapped-around part
        rows = torch.bucketize(torch.arange(hp), torch.tensor([hp - window, hp - shift]), right=True)
        cols = torch.bucketize(torch.arange(wp), torch.tensor([wp - window, wp - shift]), right=True)
        region = _windows((rows[:, None] * 3 + cols[None, :])[None, :, :, None].float(), window)[..., 0]
        mask = (region[:, :, None] != region[:, None, :]).to(logits.dtype) * -100.0  # (windows, 49, 49)
        logits = (logits.reshape(n, -1, heads, window**2, window**2) + mask[None, :, None]).flatten(0, 1)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, window * window, c)
    out = F.linear(out, state[f"{prefix}.attn.proj.weight"], state[f"{prefix}.attn.proj.bias"])
    out = out.reshape(n, hp // window, wp // window, window, window, c).transpose(2, 3).reshape(n, hp, wp, c)
    x = x + torch.roll(out, (shift, shift), (1, 2))[:, :h, :w]
    hidden = F.gelu(
        F.linear(
            _layer_norm(x, state, f"{prefix}.norm2"),
            state[f"{prefix}.mlp.fc1.weight"],
            state[f"{prefix}.mlp.fc1.bias"],
        )
    )
    return x + F.linear(hidden, state[f"{prefix}.mlp.fc2.weight"], state[f"{prefix}.mlp.fc2.bias"])


def _reference_merge(x, state, prefix):
    x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return F.linear(_layer_norm(x, state, f"{prefix}.norm"), state[f"{prefix}.reduction.weight"])


def reference_swin(state, images):
    h, w = images.shape[-2:]
    x = F.conv2d(
        F.pad(images, (0, -w % 4, 0, -h % 4)),
        state["patch_embed.proj.weight"],
        state["patch_embed.proj.bias"],
        stride=4,
    )
    x = _layer_norm(x.permute(0, 2, 3, 1), state, "patch_embed.norm")
    outputs = []
    for stage, (depth, heads) in enumerate(zip(SWIN_DEPTHS, SWIN_HEADS, strict=True)):
        for index in range(depth):
            x = _reference_block(x, state, f"layers.{stage}.blocks.{index}", heads, shift=3 * (index % 2))
        if stage > 0:
            outputs.append(_layer_norm(x, state, f"norm{stage}").permute(0, 3, 1, 2))
        if stage < 3:
            x = _reference_merge(x, state, f"layers.{stage}.downsample")
    return outputs


@pytest.mark.slow
def test_swin_matches_an_independent_forward_on_official_weights(swin):
    generator = torch.Generator().manual_seed(0)
    body = swin.body.state_dict()
    # non-trivial norms and position biases, so every parameter matters
    randomized = {key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in body.items()}
    official = {
        key: value.double() if value.is_floating_point() else value
        for key, value in swin_to_official(randomized).items()
    }
    model = copy.deepcopy(swin).double().eval()
    model.body.load_state_dict(swin_from_official(official))
    # sizes that are multiples of neither the patch nor the window, and maps smaller than a window
    for size in [(37, 53), (64, 30)]:
        images = torch.randn(2, 3, *size, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            ours, expected = model(images), reference_swin(official, images)
        assert [tuple(o.shape[-2:]) for o in ours] == [
            (math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (8, 16, 32)
        ]
        for got, want in zip(ours, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone(ModelConfig(backbone="vgg16"))


def test_resnet_from_scratch_trains_batch_norm_and_every_stage():
    """Frozen statistics would pin timm's zero-initialized last BN of each block at zero: a from-scratch
    backbone needs trainable BatchNorm, and its residual branches then receive gradients."""
    frozen = build_backbone(ModelConfig(backbone="resnet18"))
    assert all(w.abs().max() == 0 for k, w in frozen.body.state_dict().items() if k.endswith("bn2.weight"))

    scratch = build_backbone(ModelConfig(backbone="resnet18", backbone_norm="batch_norm", backbone_frozen_stages=0))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.modules())
    assert frozen_parameter_count(scratch) == 0
    sum(m.sum() for m in scratch(torch.randn(2, 3, 64, 64))).backward()
    gate = scratch.body.layer2[1].bn2.weight.grad  # the zero gate of a residual branch learns to open
    assert gate is not None and gate.abs().sum() > 0


@pytest.mark.parametrize(("stages", "trainable"), [(1, {"layer1", "layer2", "layer3", "layer4"}), (5, set())])
def test_resnet_frozen_stages(stages, trainable):
    backbone = build_backbone(ModelConfig(backbone="resnet18", backbone_frozen_stages=stages))
    assert {name.split(".")[0] for name, p in backbone.body.named_parameters() if p.requires_grad} == trainable


def test_backbone_options_are_checked():
    with pytest.raises(ValueError, match="backbone_norm"):
        ModelConfig(backbone_norm="group_norm")
    with pytest.raises(ValueError, match="backbone_frozen_stages"):
        ModelConfig(backbone_frozen_stages=6)
