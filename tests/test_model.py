"""The detector: outputs, presets, released-checkpoint layout, parameter counts, post-processing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from sparse_detr.config import get_preset
from sparse_detr.models.backbone import swin_from_official
from sparse_detr.models.detector import build_model, pad_images
from sparse_detr.models.postprocess import postprocess

OFFICIAL = Path(__file__).resolve().parent / "data" / "official"
PLAIN = {
    "model.two_stage": False,
    "model.with_box_refine": False,
    "model.keep_ratio": 0.0,
    "model.use_enc_aux_loss": False,
}
TOPK_BBR = {"model.keep_ratio": 0.0, "model.use_enc_aux_loss": False}


@pytest.fixture(scope="module")
def padded_batch():
    generator = torch.Generator().manual_seed(1)
    return pad_images(
        [torch.randn(3, 64, 128, generator=generator), torch.randn(3, 64, 64, generator=generator)]
    )


def assert_detections(out, batch, queries, classes):
    assert out["pred_logits"].shape == (batch, queries, classes)
    assert out["pred_boxes"].shape == (batch, queries, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_sparse_forward_outputs(padded_batch):
    model = tiny_model().train()
    m = model.config.model
    out = model(*padded_batch)
    layout, selection = out["layout"], out["selection"]
    num_tokens = layout.num_tokens
    n = 2
    assert_detections(out, n, m.num_queries, m.num_classes)
    assert len(out["aux_outputs"]) == m.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert_detections(aux, n, m.num_queries, m.num_classes)
    assert_detections(out["enc_outputs"], n, num_tokens, m.num_classes)
    k = selection.indices.shape[1]
    assert selection.indices.dtype == torch.int64 and k == int(selection.counts.max())
    assert len(out["enc_aux_outputs"]) == m.enc_layers - 1
    for aux in out["enc_aux_outputs"]:
        assert_detections(aux, n, k, m.num_classes)
    assert out["token_scores"].shape == (n, num_tokens)
    assert selection.counts.dtype == torch.int64 and selection.counts.shape == (n,)
    heads, levels, points = m.nheads, m.num_feature_levels, m.dec_n_points
    assert out["sampling_locations"].shape == (n, m.dec_layers, m.num_queries, heads, levels, points, 2)
    assert out["attention_weights"].shape == (n, m.dec_layers, m.num_queries, heads, levels, points)
    torch.testing.assert_close(
        out["attention_weights"].sum((-1, -2)), torch.ones(n, m.dec_layers, m.num_queries, heads)
    )
    assert layout.spatial_shapes.tolist() == [[8, 16], [4, 8], [2, 4], [1, 2]]
    assert layout.level_start_index.tolist() == [0, 128, 160, 168]
    assert layout.padding_mask.dtype == torch.bool and layout.padding_mask[1].sum() == num_tokens // 2
    torch.testing.assert_close(layout.valid_ratios[1], torch.tensor([[0.5, 1.0]] * 4))
    assert "backbone_outputs" not in out


def test_loss_only_outputs_are_skipped_in_eval(padded_batch):
    model = tiny_model().eval()
    with torch.no_grad():
        plain = model(*padded_batch)
        with_aux = model(*padded_batch, return_aux=True)
    assert "enc_aux_outputs" not in plain
    assert len(with_aux["enc_aux_outputs"]) == model.config.model.enc_layers - 1
    torch.testing.assert_close(plain["pred_logits"], with_aux["pred_logits"])


def test_plain_preset_layout_and_forward(padded_batch):
    model = tiny_model(PLAIN).train()
    keys = model.state_dict().keys()
    assert "query_embed.weight" in keys and "transformer.reference_points.weight" in keys
    assert {k.split(".")[1] for k in keys if k.startswith("class_embed.")} == {"0"}
    assert not any(
        k.startswith(("transformer.enc_output", "transformer.pos_trans", "transformer.enc_mask"))
        for k in keys
    )
    out = model(*padded_batch)
    assert_detections(out, 2, model.config.model.num_queries, model.config.model.num_classes)
    assert not {"enc_outputs", "token_scores", "selection", "enc_aux_outputs"} & out.keys()
    torch.testing.assert_close(model.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))


def test_topk_bbr_preset_has_proposals_but_no_sparsity(padded_batch):
    model = tiny_model(TOPK_BBR).train()
    assert len(model.class_embed) == model.config.model.dec_layers + 1
    out = model(*padded_batch)
    assert "enc_outputs" in out and not {"token_scores", "selection", "enc_aux_outputs"} & out.keys()


def test_head_initialization():
    model = tiny_model()
    m = model.config.model
    assert len(model.class_embed) == len(model.bbox_embed) == m.dec_layers + 1 + m.enc_layers - 1
    for classes, boxes in zip(model.class_embed, model.bbox_embed):
        torch.testing.assert_close(classes.bias, torch.full((m.num_classes,), -math.log(99)))
        torch.testing.assert_close(classes.weight, model.class_embed[0].weight)
        assert not boxes.layers[-1].weight.any() and not boxes.layers[-1].bias.any()


def test_mask_none_means_no_padding():
    model = tiny_model().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(images)
        b = model(images, torch.zeros(1, 64, 64, dtype=torch.bool))
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)


def test_too_few_tokens_for_the_queries_is_a_clear_error():
    model = tiny_model().eval()  # 50 queries; a 32x32 image gives 16 + 4 + 1 + 1 tokens
    with pytest.raises(ValueError, match="fewer than the 50 queries"):
        model(torch.randn(1, 3, 32, 32))


def test_float64(padded_batch):
    model = tiny_model().double().eval()
    images, mask = padded_batch
    with torch.no_grad():
        out = model(images.double(), mask, return_aux=True)
    assert out["pred_logits"].dtype == out["pred_boxes"].dtype == torch.float64
    assert out["enc_aux_outputs"][0]["pred_boxes"].dtype == torch.float64
    assert torch.isfinite(out["pred_logits"]).all()


def test_same_seed_same_model_and_outputs(padded_batch):
    first, second = tiny_model(seed=3).eval(), tiny_model(seed=3).eval()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        a, b = first(*padded_batch), second(*padded_batch)
    for key in ("pred_logits", "pred_boxes", "token_scores"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["selection"].indices, b["selection"].indices)
    assert not torch.equal(tiny_model(seed=4).class_embed[0].weight, first.class_embed[0].weight)


def test_batch_composition_spec_9():
    """SPEC §9: outputs depend on the batch. An image that is the largest of its batch (no padding) gets
    the same outputs as alone: its scores, its count and k do not depend on the others. A padded image
    does not: its scoring network mean-pools over its padded tokens too, and the backbone sees padding."""
    model = tiny_model().double().eval()
    generator = torch.Generator().manual_seed(2)
    large = torch.randn(3, 64, 128, generator=generator, dtype=torch.float64)
    small = torch.randn(3, 64, 64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        batch = model(*pad_images([large, small]))
        large_alone = model(large[None])
        small_alone = model(small[None])
    for key in ("pred_logits", "pred_boxes", "token_scores"):
        torch.testing.assert_close(batch[key][0], large_alone[key][0])
    assert torch.equal(batch["selection"].counts[1], small_alone["selection"].counts[0])
    valid = ~batch["layout"].padding_mask[1]
    assert valid.sum() == small_alone["token_scores"].shape[1]
    assert not torch.allclose(batch["token_scores"][1][valid], small_alone["token_scores"][0])


def test_pad_images():
    images, mask = pad_images([torch.ones(3, 4, 6), torch.full((3, 5, 2), 2.0)])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert mask[0].sum() == 6 and mask[0, 4].all() and not mask[0, :4].any()
    assert mask[1].sum() == 20 and not mask[1, :, :2].any()
    assert images[1, :, :, 2:].eq(0).all() and images[1, :, :, :2].eq(2).all() and images[0, :, 4].eq(0).all()


def test_postprocess_top_k_over_queries_and_classes():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1], logits[0, 0, 3] = 5.0, 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), top_k=2)
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([5.0, 3.0])))
    assert result["labels"].tolist() == [1, 3]
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]])
    )
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def read_official(name: str) -> dict[str, tuple[int, ...]]:
    """Canonical (non-alias) state_dict names and shapes of a released checkpoint."""
    aliases = {line.split("\t")[0] for line in (OFFICIAL / f"aliases_{name}.txt").read_text().splitlines()}
    shapes = {}
    for line in (OFFICIAL / f"keys_{name}.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key not in aliases:
            shapes[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def swin_keys_in_timm_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Official key shapes with the Swin body renamed as the checkpoint loader maps it (buffers that the
    loader checks and drops, ``relative_position_index`` and ``attn_mask``, left out)."""
    prefix = "backbone.0.body."
    body = {
        key.removeprefix(prefix): torch.empty(shape)
        for key, shape in shapes.items()
        if key.startswith(prefix) and not key.endswith("relative_position_index")
    }
    renamed = {prefix + key: tuple(value.shape) for key, value in swin_from_official(body).items()}
    return {**{k: v for k, v in shapes.items() if not k.startswith(prefix)}, **renamed}


FULL_SIZE = [
    # (official file, preset, backbone, trainable, all) from official/README.md
    ("r50_deformable_detr", "deformable", "r50", 39_847_265, 40_069_665),
    ("r50_efficient_detr", "deformable-topk-bbr", "r50", 40_827_289, 41_049_689),
    ("r50_sparse_detr_rho_0.1", "sparse-rho0.1", "r50", 41_714_805, 41_937_205),
    ("swint_deformable_detr", "deformable", "swin-t", 40_308_613, 40_612_699),
    ("swint_sparse_detr_rho_0.1", "sparse-rho0.1", "swin-t", 42_176_153, 42_480_239),
]


@pytest.mark.slow
@pytest.mark.parametrize("official, preset, backbone, trainable, total", FULL_SIZE)
def test_full_size_layout_and_parameter_counts(official, preset, backbone, trainable, total):
    model = build_model(get_preset(preset, backbone))
    expected = read_official(official)
    if backbone == "swin-t":
        expected = swin_keys_in_timm_layout(expected)
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sorted(actual.keys() - expected.keys()) == [] and sorted(expected.keys() - actual.keys()) == []
    assert [key for key in expected if actual[key] != expected[key]] == []
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in model.parameters()) == total
