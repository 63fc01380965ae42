"""Pretrained backbone weights: every file layout lands in full, cached downloads resolve offline, missing
weights fail with one line, random backbones must train, frozen parts stay frozen through training."""

from __future__ import annotations

import hashlib
import re
import urllib.error
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from test_backbone import swin_to_official
from torchvision.ops.misc import FrozenBatchNorm2d

from sparse_detr.config import ModelConfig, apply_overrides, get_preset
from sparse_detr.models import (
    BackboneWeights,
    WeightsUnavailableError,
    build_criterion,
    build_model,
    check_backbone_trainable,
    pad_images,
    resolve_backbone_weights,
)
from sparse_detr.models.backbone import build_backbone

SWIN_REPO = "timm/swin_tiny_patch4_window7_224.ms_in1k"
# Swin output norms: not in classification weights, they keep their initialization
OUTPUT_NORM = re.compile(r"norm\d\.")


def randomized(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """``state_dict`` with distinct random floats, so that a tensor that does not land shows."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value.clone()
        for key, value in state_dict.items()
    }


def resolved(path: Path, **model_fields) -> tuple[ModelConfig, BackboneWeights]:
    """A model config starting from ``path`` and its resolved weights, checked against hashlib."""
    model_config = ModelConfig(pretrained_backbone=str(path), **model_fields)
    weights = resolve_backbone_weights(model_config)
    assert weights == BackboneWeights(str(path), path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest())
    return model_config, weights


def assert_body_holds(backbone: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every body tensor equals ``expected``'s (BN batch counters and Swin's output norms excepted)."""
    body = {
        key: value
        for key, value in backbone.body.state_dict().items()
        if not key.endswith("num_batches_tracked") and not OUTPUT_NORM.match(key)
    }
    assert body, "empty body"
    for key, value in body.items():
        assert torch.equal(value, expected[key]), key


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (with ``fc.*`` and ``num_batches_tracked``), randomized."""
    return randomized(torchvision.models.resnet18().state_dict())


@pytest.fixture(scope="module")
def timm_swin() -> dict[str, torch.Tensor]:
    """timm's Swin-T classification state dict (``head.fc.*``, final ``norm.*``), randomized."""
    return randomized(timm.create_model("swin_tiny_patch4_window7_224").state_dict())


def trainable_resnet18() -> dict[str, torch.Tensor]:
    """torchvision resnet18 weights a forward can run on: its initialization, with BatchNorm statistics and
    affine parameters set to distinct plausible values (positive variances and scales)."""
    generator = torch.Generator().manual_seed(0)
    state_dict = torchvision.models.resnet18().state_dict()
    for key, value in state_dict.items():
        if key.endswith(("running_var", "bn1.weight", "bn2.weight", "downsample.1.weight")):
            state_dict[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith(("running_mean", "bias")) and not key.startswith("fc."):
            state_dict[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state_dict


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    return path


@pytest.mark.parametrize("norm", ["frozen_bn", "batch_norm"])
@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_torchvision_resnet_file(tmp_path, wrapper, norm):
    state_dict = torchvision_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(state_dict if wrapper is None else {wrapper: state_dict, "epoch": 3}, path)
    model_config, weights = resolved(path, backbone="resnet18", backbone_norm=norm)
    assert_body_holds(build_backbone(model_config, weights), state_dict)


def test_timm_resnet_safetensors_file(tmp_path):
    state_dict = randomized(timm.create_model("resnet10t").state_dict())  # deep stem: conv1.0, conv1.1, ...
    path = write_safetensors(tmp_path / "model.safetensors", state_dict)
    model_config, weights = resolved(path, backbone="resnet10t")
    assert_body_holds(build_backbone(model_config, weights), state_dict)


def test_scrl_file(tmp_path):
    resnet = torchvision.models.resnet18()
    encoder = torch.nn.Sequential(*list(resnet.children())[:-2])  # SCRL's encoder: the ResNet without its head
    encoder_state = randomized(encoder.state_dict())
    online = {f"encoder.{key}": value for key, value in encoder_state.items()}
    online["projector.0.weight"] = online["predictor.0.weight"] = torch.zeros(512, 512)
    path = tmp_path / "scrl.pth"
    torch.save({"online_network_state_dict": online, "target_network_state_dict": {}}, path)
    model_config, weights = resolved(path, backbone="resnet18")
    expected = dict(zip(resnet.state_dict(), encoder_state.values()))  # the encoder keeps the ResNet's order
    assert_body_holds(build_backbone(model_config, weights), expected)


def test_timm_swin_file(tmp_path, timm_swin):
    path = write_safetensors(tmp_path / "swin.safetensors", timm_swin)
    model_config, weights = resolved(path, backbone="swin-t")
    assert_body_holds(build_backbone(model_config, weights), timm_swin)


def test_official_swin_file(tmp_path, timm_swin):
    official = {key.replace("head.fc.", "head."): value for key, value in swin_to_official(timm_swin).items()}
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # a 224x224 shift mask
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": official}, path)
    model_config, weights = resolved(path, backbone="swin-t")
    backbone = build_backbone(model_config, weights)
    assert_body_holds(backbone, timm_swin)
    torch.testing.assert_close(backbone.body.norm3.weight, torch.ones(768))  # output norms keep their init


def test_a_file_that_does_not_fit_is_refused(tmp_path):
    broken = torchvision_resnet18()
    del broken["layer2.0.conv1.weight"]
    broken["layer9.weight"] = torch.zeros(1)
    path = tmp_path / "resnet18.pth"
    torch.save(broken, path)
    model_config, weights = resolved(path, backbone="resnet18")
    with pytest.raises(
        ValueError,
        match=r"missing 1 key\(s\): layer2\.0\.conv1\.weight; unexpected 1 key\(s\): layer9\.weight",
    ):
        build_backbone(model_config, weights)


def test_weights_record():
    weights = BackboneWeights("imagenet", Path("/cache/resnet50-0676ba61.pth"), "ab" * 32)
    assert weights.to_dict() == {"source": "imagenet", "file": "/cache/resnet50-0676ba61.pth", "sha256": "ab" * 32}
    assert resolve_backbone_weights(get_preset("tiny").model) is None


# --- caches and downloads, without network ---


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches in ``tmp_path``, the Hub offline; returns the torch home."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "huggingface"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch"


def no_download(url, dst, hash_prefix=None, progress=True):
    raise urllib.error.URLError("no network")


def test_imagenet_r50_from_the_torchvision_cache(empty_caches, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    state_dict = randomized(torchvision.models.resnet50().state_dict())
    cached = empty_caches / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state_dict, cached)
    weights = resolve_backbone_weights(ModelConfig(backbone="r50"))
    assert (weights.source, weights.file) == ("imagenet", cached)
    assert weights.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert_body_holds(build_backbone(ModelConfig(backbone="r50"), weights), state_dict)


def test_imagenet_download_goes_to_the_torchvision_cache(empty_caches, monkeypatch):
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst), hash_prefix, progress))
        torch.save(torchvision_resnet18(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model_config = ModelConfig(backbone="resnet18")
    weights = resolve_backbone_weights(model_config, progress=False)
    cached = empty_caches / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", cached, "f37072fd", False)]
    assert weights.file == cached
    assert resolve_backbone_weights(model_config) == weights and len(calls) == 1  # downloaded once


def test_swin_weights_from_the_hugging_face_cache(empty_caches, tmp_path, timm_swin):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "huggingface" / f"models--{SWIN_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    cached = write_safetensors(repo / "snapshots" / commit / "model.safetensors", timm_swin)
    weights = resolve_backbone_weights(ModelConfig(backbone="swin-t"))
    assert (weights.source, weights.file) == ("imagenet", cached)
    assert resolve_backbone_weights(ModelConfig(backbone="swin-t", pretrained_backbone="timm")).file == cached
    assert_body_holds(build_backbone(ModelConfig(backbone="swin-t"), weights), timm_swin)


@pytest.mark.parametrize(
    ("backbone", "source", "named"),
    [
        ("r50", "imagenet", "resnet50-0676ba61.pth"),
        ("swin-t", "imagenet", f"{SWIN_REPO}/model.safetensors"),
        ("r50", "timm", "timm/resnet50.a1_in1k/model.safetensors"),
        ("resnet10t", "imagenet", "timm/resnet10t.c3_in1k/model.safetensors"),
    ],
)
def test_unavailable_weights_fail_in_one_line(empty_caches, monkeypatch, backbone, source, named):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(WeightsUnavailableError) as raised:
        resolve_backbone_weights(ModelConfig(backbone=backbone, pretrained_backbone=source))
    message = str(raised.value)
    assert "\n" not in message and named in message and "--pretrained-backbone" in message


def test_hub_download_failure_fails_in_one_line(empty_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def hf_hub_download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise ConnectionError("Name or service not known\nmore details")

    monkeypatch.setattr("sparse_detr.models.backbone_weights.hf_hub_download", hf_hub_download)
    with pytest.raises(
        WeightsUnavailableError,
        match=r"\(Name or service not known\).*--pretrained-backbone /path/to/model\.safetensors",
    ):
        resolve_backbone_weights(ModelConfig(backbone="swin-t"))
    assert calls == [True, False]  # the cache first, then the Hub


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "gone.pth"
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(missing))):
        resolve_backbone_weights(ModelConfig(pretrained_backbone=str(missing)))


# --- what trains ---


def test_a_random_backbone_must_train_its_norms_and_stages():
    with pytest.raises(ValueError, match="backbone_norm=batch_norm") as raised:
        check_backbone_trainable(ModelConfig(backbone="resnet18", pretrained_backbone="none"))
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="backbone_frozen_stages=0") as raised:
        check_backbone_trainable(ModelConfig(backbone="swin-t", pretrained_backbone="none"))
    assert "backbone_norm" not in str(raised.value)  # Swin has no BatchNorm
    check_backbone_trainable(get_preset("tiny").model)
    check_backbone_trainable(ModelConfig(backbone="swin-t", pretrained_backbone="none", backbone_frozen_stages=0))
    check_backbone_trainable(ModelConfig())  # pretrained: frozen parts keep ImageNet values


@pytest.mark.parametrize(
    ("stages", "frozen"),
    [
        (0, set()),
        (1, {"patch_embed"}),
        (2, {"patch_embed", "layers.0.blocks", "layers.1.downsample"}),
        (3, {"patch_embed", "layers.0.blocks", "layers.1.downsample", "layers.1.blocks", "layers.2.downsample"}),
    ],
)
def test_swin_frozen_stages(stages, frozen):
    backbone = build_backbone(ModelConfig(backbone="swin-t", backbone_frozen_stages=stages))
    names = {name for name, p in backbone.body.named_parameters() if not p.requires_grad}
    assert {re.sub(r"^(patch_embed|layers\.\d\.(blocks|downsample))\..*", r"\1", name) for name in names} == frozen


@pytest.mark.slow
def test_training_keeps_frozen_parts_frozen(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    pretrained = trainable_resnet18()
    torch.save(pretrained, path)
    overrides = {
        "model.backbone": "resnet18",
        "model.backbone_norm": "frozen_bn",
        "model.backbone_frozen_stages": 2,
        "model.pretrained_backbone": str(path),
    }
    config = apply_overrides(get_preset("tiny"), overrides)
    check_backbone_trainable(config.model)
    model = build_model(config, resolve_backbone_weights(config.model)).train()
    criterion = build_criterion(config)
    assert_body_holds(model.backbone[0], pretrained)
    body = model.backbone[0].body
    before = {key: value.clone() for key, value in body.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images([torch.randn(3, 96, 128, generator=generator) for _ in range(2)])
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        losses = criterion(model(images, mask), targets)
        optimizer.zero_grad()
        sum(criterion.weight_dict[k] * losses[k] for k in criterion.weight_dict).backward()
        optimizer.step()

    after = body.state_dict()
    norms = tuple(f"{name}." for name, module in body.named_modules() if isinstance(module, FrozenBatchNorm2d))
    frozen = [key for key in after if key.startswith(("conv1.", "bn1.", "layer1.", *norms))]
    assert "layer4.0.downsample.1.running_var" in frozen
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    trained = [key for key in after if key.startswith(("layer2.", "layer3.", "layer4.")) and ".conv" in key]
    assert trained and all(not torch.equal(after[key], before[key]) for key in trained)
