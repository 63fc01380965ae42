"""Checkpoints: released official files (R50 and Swin-T presets) and this project's own files, strict
loading and the errors for files that do not fit."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
import torch
from test_backbone import OFFICIAL, swin_to_official

from sparse_detr.checkpoint import TrainingCheckpoint, read_checkpoint, save_checkpoint
from sparse_detr.config import config_to_dict, get_preset
from sparse_detr.models.detector import build_model, pad_images
from sparse_detr.zoo import load_model

BODY = "backbone.0.body."

# (preset, backbone, official key/alias files)
OFFICIAL_CASES = {
    "r50-deformable": ("deformable", "r50", "r50_deformable_detr"),
    "r50-topk-bbr": ("deformable-topk-bbr", "r50", "r50_efficient_detr"),
    "r50-sparse-0.1": ("sparse-rho0.1", "r50", "r50_sparse_detr_rho_0.1"),
    "r50-sparse-0.3": ("sparse-rho0.3", "r50", "r50_sparse_detr_rho_0.1"),  # every ρ has the same keys
    "swint-sparse-0.1": ("sparse-rho0.1", "swin-t", "swint_sparse_detr_rho_0.1"),
}


class Untrusted:
    """A type that safe unpickling must refuse."""


def official_args(config) -> argparse.Namespace:
    """An ``args`` Namespace like the released files' (the reference main.py options)."""
    model = config.model
    return argparse.Namespace(
        lr=2e-4,
        lr_backbone=2e-5,
        batch_size=2,
        epochs=50,
        lr_drop=40,
        clip_max_norm=0.1,
        with_box_refine=model.with_box_refine,
        two_stage=model.two_stage,
        backbone={"r50": "resnet50"}.get(model.backbone, model.backbone),
        dilation=False,
        position_embedding="sine",
        num_feature_levels=model.num_feature_levels,
        enc_layers=model.enc_layers,
        dec_layers=model.dec_layers,
        dim_feedforward=model.dim_feedforward,
        hidden_dim=model.hidden_dim,
        dropout=model.dropout,
        nheads=model.nheads,
        num_queries=model.num_queries,
        dec_n_points=model.dec_n_points,
        enc_n_points=model.enc_n_points,
        eff_query_init=model.two_stage,
        eff_specific_head=model.two_stage,
        use_enc_aux_loss=model.use_enc_aux_loss,
        rho=model.keep_ratio,
        masks=False,
        aux_loss=model.aux_loss,
        set_cost_class=2,
        set_cost_bbox=5,
        set_cost_giou=2,
        cls_loss_coef=2,
        bbox_loss_coef=5,
        giou_loss_coef=2,
        mask_prediction_coef=1,
        focal_alpha=0.25,
        dataset_file="coco",
        device="cuda",
        seed=42,
    )


def official_state_dict(model, config_file: str) -> dict[str, torch.Tensor]:
    """``model``'s weights in the released layout: Swin in Microsoft names, every alias key present with
    an equal (separate) tensor, in the order and with the exact names/shapes/dtypes of the keys file."""
    state = model.state_dict()
    if model.config.model.backbone == "swin-t":
        body = swin_to_official({k.removeprefix(BODY): v for k, v in state.items() if k.startswith(BODY)})
        state = {k: v for k, v in state.items() if not k.startswith(BODY)} | {BODY + k: v for k, v in body.items()}
    for line in (OFFICIAL / f"aliases_{config_file}.txt").read_text().splitlines():
        alias, canonical = line.split("\t")
        state[alias] = state[canonical].clone()
    expected = [line.split("\t") for line in (OFFICIAL / f"keys_{config_file}.txt").read_text().splitlines()]
    assert sorted(state) == sorted(name for name, _, _ in expected)
    for name, shape, dtype in expected:
        assert list(state[name].shape) == [int(s) for s in re.findall(r"\d+", shape)], name
        assert str(state[name].dtype) == f"torch.{dtype}", name
    return {name: state[name] for name, _, _ in expected}


def perturbed(model):
    """Give every floating tensor distinct values, so that a tensor that does not land shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=list(OFFICIAL_CASES))
def official_file(request, tmp_path_factory):
    """(model it was written from, path of an official-layout file with args, config file name)."""
    preset, backbone, config_file = OFFICIAL_CASES[request.param]
    model = perturbed(build_model(get_preset(preset, backbone)))
    path = tmp_path_factory.mktemp("official") / f"{request.param}.pth"
    torch.save(
        {
            "model": official_state_dict(model, config_file),
            "args": official_args(model.config),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 49,
        },
        path,
    )
    return model, path, config_file


def padded_pair():
    """Two images padded into one batch, large enough for 300 two-stage queries (510 tokens)."""
    generator = torch.Generator().manual_seed(0)
    return pad_images([torch.randn(3, 128, 160, generator=generator), torch.randn(3, 96, 192, generator=generator)])


@pytest.mark.slow
def test_official_checkpoint_loads_and_runs(official_file):
    source, path, _ = official_file
    model = load_model(path)
    assert model.config == source.config and not model.training
    loaded = model.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key

    images, mask = padded_pair()
    with torch.no_grad():
        outputs = model(images, mask)
    config = model.config.model
    queries, classes = config.num_queries, config.num_classes
    assert outputs["pred_logits"].shape == (2, queries, classes)
    assert outputs["pred_boxes"].shape == (2, queries, 4)
    assert len(outputs["aux_outputs"]) == config.dec_layers - 1
    for name in ("pred_logits", "pred_boxes"):
        assert torch.isfinite(outputs[name]).all()
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    if config.two_stage:
        assert torch.isfinite(outputs["enc_outputs"]["pred_logits"]).all()
    if config.is_sparse:
        tokens = outputs["layout"].num_tokens
        selection = outputs["selection"]
        assert outputs["token_scores"].shape == (2, tokens)
        assert selection.indices.shape == (2, int(selection.counts.max()))


@pytest.fixture(scope="module")
def topk_official():
    model = build_model(get_preset("deformable-topk-bbr"))
    return {"model": official_state_dict(model, "r50_efficient_detr"), "args": official_args(model.config)}


def _write(tmp_path, content) -> str:
    path = tmp_path / "checkpoint.pth"
    torch.save(content, path)
    return str(path)


def _edited(content, edit):
    state = dict(content["model"])
    edit(state)
    return {**content, "model": state}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["transformer.decoder.class_embed.3.bias"].add_(1.0),
            r"transformer\.decoder\.class_embed\.3\.bias should hold the same tensor as class_embed\.3\.bias",
        ),
        (
            lambda s: s.pop("transformer.enc_output.weight"),
            r"missing 1 key\(s\): transformer\.enc_output\.weight",
        ),
        (
            lambda s: s.update({"transformer.extra.weight": torch.zeros(2)}),
            r"unexpected 1 key\(s\): transformer\.extra\.weight",
        ),
        (
            lambda s: s.update({"query_embed.weight": torch.zeros(300, 512)}),
            r"unexpected 1 key\(s\): query_embed\.weight",
        ),
        (
            lambda s: s.update({"input_proj.0.0.weight": torch.zeros(256, 512, 3, 3)}),
            r"1 shape mismatch\(es\) \(file vs model\): "
            r"input_proj\.0\.0\.weight \(256, 512, 3, 3\) vs \(256, 512, 1, 1\)",
        ),
    ],
    ids=["corrupted-alias", "missing", "unexpected", "other-architecture", "wrong-shape"],
)
def test_official_checkpoint_that_does_not_fit(topk_official, tmp_path, edit, message):
    content = _edited(topk_official, lambda s: (s.update({k: v.clone() for k, v in s.items()}), edit(s)))
    with pytest.raises(ValueError, match=message):
        load_model(_write(tmp_path, content))


def test_long_key_lists_are_truncated(topk_official, tmp_path):
    content = _edited(
        topk_official, lambda s: [s.pop(k) for k in list(s) if k.startswith("transformer.decoder.layers.")]
    )
    with pytest.raises(ValueError, match=r"missing 132 key\(s\): (\S+, ){7}\S+ … and 124 more$"):
        load_model(_write(tmp_path, content))


def test_official_checkpoint_without_args_needs_a_preset(topk_official, tmp_path):
    path = _write(tmp_path, {"model": topk_official["model"]})
    with pytest.raises(ValueError, match="has no 'args'.*pass preset="):
        load_model(path)
    assert load_model(path, preset="deformable-topk-bbr").config.name == "deformable-topk-bbr"
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model(path, preset="sparse-rho0.2")  # the shapes tell it is another architecture


@pytest.fixture(scope="module")
def tiny_model():
    return perturbed(build_model(get_preset("tiny")))


def test_own_checkpoint_round_trip(tiny_model, tmp_path):
    training = TrainingCheckpoint(optimizer={"lr": 1e-4}, lr_scheduler={}, scaler={}, epoch=3)
    path = save_checkpoint(tmp_path / "run" / "tiny.pth", tiny_model, training)
    content = read_checkpoint(path)
    assert (content["format"], content["version"], content["epoch"]) == ("sparse_detr", 1, 3)
    model = load_model(path)
    assert model.config == tiny_model.config and not model.training
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    images, mask = padded_pair()
    with torch.no_grad():
        outputs = model(images, mask)
    assert outputs["pred_logits"].shape == (2, 50, 91) and torch.isfinite(outputs["pred_boxes"]).all()


def test_own_checkpoint_overrides_and_pretrained_path(tiny_model, tmp_path):
    config = dataclasses.replace(
        tiny_model.config,
        model=dataclasses.replace(tiny_model.config.model, pretrained_backbone=str(tmp_path / "gone.pth")),
    )
    tiny_model.config, original = config, tiny_model.config
    try:
        path = save_checkpoint(tmp_path / "tiny.pth", tiny_model)
    finally:
        tiny_model.config = original
    # the stored pretrained-weights path is not read again: the checkpoint holds the weights
    model = load_model(path, overrides={"model.keep_ratio": 0.5})
    assert model.config.model.keep_ratio == 0.5 and model.config.model.pretrained_backbone == str(tmp_path / "gone.pth")


def test_untrusted_objects_are_refused_unless_trusted(tiny_model, tmp_path):
    path = _write(
        tmp_path,
        {
            "format": "sparse_detr",
            "version": 1,
            "config": config_to_dict(tiny_model.config),
            "model": tiny_model.state_dict(),
            "note": Untrusted(),
        },
    )
    with pytest.raises(ValueError, match=r"holds test_checkpoint\.Untrusted object\(s\).*trust_checkpoint=True"):
        load_model(path)
    assert load_model(path, trust_checkpoint=True).config == tiny_model.config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"plain text, not a checkpoint", "is not a PyTorch checkpoint"),
        ([torch.zeros(2)], r"is not a detector checkpoint: no 'model' state dict \(list\)"),
        ({"state_dict": {}}, r"no 'model' state dict \(keys state_dict\)"),
    ],
    ids=["text", "list", "no-model-key"],
)
def test_files_that_are_not_detector_checkpoints(tmp_path, content, message):
    path = tmp_path / "file.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.pth"):
        load_model(tmp_path / "nowhere.pth")
