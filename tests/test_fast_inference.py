"""The inference-ready model: folded BatchNorm, channels_last, bfloat16 autocast, torch.compile, and the
trace-friendly shapes (mask resizing, the top-k bound) that compile and export rely on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from sparse_detr.config import get_preset
from sparse_detr.models import build_model, fold_batch_norms, pad_images, prepare_for_inference
from sparse_detr.models.backbone import ResNetBackbone
from sparse_detr.models.detector import downsample_mask
from sparse_detr.models.fast_inference import cast_matmul_weights
from sparse_detr.models.scoring import keep_counts, most_kept


def _randomize_norms(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding has work to do."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            count = norm.running_mean.numel()
            norm.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            norm.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)


def _padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pad_images([torch.randn(3, 96, 128, generator=generator), torch.randn(3, 112, 96, generator=generator)])


@pytest.mark.parametrize("norm", ["batch_norm", "frozen_bn"])
def test_folded_backbone_equals_the_unfolded_one(norm, one_thread):
    backbone = ResNetBackbone("resnet18d", norm=norm, frozen_stages=0)
    _randomize_norms(backbone)
    backbone.eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = backbone(images)
        folded = copy.deepcopy(backbone)
        count = fold_batch_norms(folded.body)
        got = folded(images)
    norms = sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in backbone.modules())
    assert count == norms  # every norm follows a convolution in a timm ResNet
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in folded.modules())
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_prepared_detector_equals_the_plain_one(one_thread):
    model = tiny_model({"model.keep_ratio": 0.3})
    _randomize_norms(model)
    model.eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    runner = prepare_for_inference(copy.deepcopy(model))
    got = runner(images, mask)
    assert runner.dtype == "float32"
    assert runner.model.backbone[0].body.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["selection"].counts, expected["selection"].counts)


def test_bfloat16_reaches_the_backbone_and_the_transformer_and_stays_close(one_thread):
    """Dense, so that every token's encoder detection compares (top-k choices of a random model flip under
    bfloat16 rounding; the AP cost on a trained model is in docs/PERFORMANCE.md)."""
    model = tiny_model({"model.keep_ratio": 0.0})
    model.eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    runner = prepare_for_inference(copy.deepcopy(model), amp="bf16")
    seen = {}
    runner.model.backbone[0].register_forward_hook(lambda m, i, out: seen.update(backbone=out[-1].dtype))
    projection = runner.model.transformer.encoder.layers[0].self_attn.value_proj
    projection.register_forward_hook(lambda m, i, out: seen.update(linear=out.dtype))
    got = runner(images, mask)
    assert seen == {"backbone": torch.bfloat16, "linear": torch.bfloat16}
    assert runner.dtype == "bfloat16 autocast"
    # bfloat16 keeps 8 bits of mantissa: the encoder's per-token detections stay within a few hundredths
    for key, tolerance in (("pred_logits", 0.1), ("pred_boxes", 0.02)):
        difference = got["enc_outputs"][key].float() - expected["enc_outputs"][key]
        assert difference.abs().max() < tolerance, key
    assert got["pred_logits"].dtype == torch.bfloat16  # the heads ran in bfloat16 too


def test_weights_cast_once_give_what_autocast_gives(one_thread):
    model = tiny_model({"model.keep_ratio": 0.3}).eval()
    cast = copy.deepcopy(model)
    assert cast_matmul_weights(cast, torch.bfloat16) > 0
    assert cast.input_proj[0][0].weight.dtype == torch.bfloat16 and cast.transformer.level_embed.dtype == torch.float32
    images, mask = _padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(images, mask), cast(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(got[key], expected[key]), key


def test_downsampled_mask_equals_nearest_interpolation():
    generator = torch.Generator().manual_seed(0)
    for height in [1, 2, 7, 31, 64, 100, 333, 800, 1066, 1333]:
        for size in {1, max(1, height // 8), -(-height // 8), -(-height // 32), -(-height // 64), height}:
            mask = torch.rand(2, height, 5, generator=generator) > 0.5
            expected = F.interpolate(mask[None].float(), size=(size, 5)).to(torch.bool)[0]
            assert torch.equal(downsample_mask(mask, (size, 5)), expected), (height, size)


@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.5, 1.0])
def test_the_shape_bound_holds_every_keep_count(keep_ratio):
    for tokens in range(1, 3000, 7):
        padding = torch.zeros(1, tokens, dtype=torch.bool)
        assert int(keep_counts(padding, keep_ratio)) <= most_kept(tokens, keep_ratio)


def test_traced_top_k_bound_encodes_the_same_tokens(monkeypatch, one_thread):
    """While traced, k is the shape bound, not max(counts): the kept tokens and the outputs are the same."""
    model = tiny_model({"model.keep_ratio": 0.3}).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        got = model(images, mask)
    assert got["selection"].indices.shape[1] > expected["selection"].indices.shape[1]
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_r50_prepared_for_inference_equals_the_plain_model(one_thread):
    """The plain preset (learned queries, no top-k) so that no ranking of near-equal random scores can flip."""
    torch.manual_seed(0)
    model = build_model(get_preset("deformable")).eval()
    _randomize_norms(model.backbone)
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected = model(images)
    got = prepare_for_inference(model)(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_detector_equals_eager(one_thread):
    model = tiny_model({"model.keep_ratio": 0.3}).eval()
    images, mask = _padded_batch()
    with torch.no_grad():
        expected = model(images, mask)
    runner = prepare_for_inference(copy.deepcopy(model), compile=True)
    got = runner(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("flags", "hardware", "fragment"),
    [
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMX", "AMX tiles"),
        ("avx2 avx512f avx512_bf16", "AVX512-BF16", "Zen 4"),
        ("avx2 avx512f", None, "emulated and slower than float32"),
    ],
)
def test_bf16_hardware_knows_amx_and_avx512_bf16(monkeypatch, flags, hardware, fragment):
    from sparse_detr.utils import cpu

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"model name": "test CPU", "flags": flags})
    assert cpu.bf16_hardware() == hardware and fragment in cpu.bf16_note()
