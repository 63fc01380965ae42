"""Token sparsification semantics of the encoder (SPEC §4)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, unpadded_layout

from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.models.detector import build_model, pad_images
from sparse_detr.models.encoder import EncoderLayer, SparseEncoder, encoder_reference_points
from sparse_detr.models.scoring import ScoringNetwork, fill_padded_scores, keep_counts
from sparse_detr.models.token_layout import TokenSelection


@pytest.fixture(scope="module", name="tiny_model")
def tiny_model_fixture():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def padded_batch():
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 128, generator=generator), torch.randn(3, 64, 64, generator=generator)]
    return pad_images(images)


def encode(model, images, mask, **kwargs):
    """Model outputs plus the encoder's input and output token maps (N, S, C)."""
    captured = {}

    def hook(module, args, output):
        captured["src"], captured["memory"] = args[0], output[0]

    handle = model.transformer.encoder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(images, mask, **kwargs)
    finally:
        handle.remove()
    return out, captured["src"], captured["memory"]


def changed_tokens(src, memory):
    """(N, S) True where the encoder changed a token's features."""
    return (src != memory).any(-1)


@pytest.mark.parametrize("keep_ratio", [None, 0.1, 0.5])
def test_exactly_the_kept_tokens_change(tiny_model, padded_batch, keep_ratio):
    out, src, memory = encode(tiny_model, *padded_batch, keep_ratio=keep_ratio)
    ratio = tiny_model.config.model.keep_ratio if keep_ratio is None else keep_ratio
    selection = out["selection"]
    valid = (~out["layout"].padding_mask).sum(1)
    expected_counts = (valid.double() * ratio).long() + 1
    assert torch.equal(selection.counts, expected_counts)
    assert selection.indices.shape[1] == expected_counts.max()
    changed = changed_tokens(src, memory)
    for i, count in enumerate(expected_counts.tolist()):
        expected = torch.zeros_like(changed[i])
        expected[selection.indices[i, :count]] = True
        assert torch.equal(changed[i], expected)


def test_padded_tokens_are_never_kept(tiny_model, padded_batch):
    out, src, memory = encode(tiny_model, *padded_batch)
    padding_mask = out["layout"].padding_mask
    assert padding_mask[1].any()
    assert not (changed_tokens(src, memory) & padding_mask).any()
    scores = out["token_scores"]
    assert torch.all(scores[padding_mask] == scores.min())


def test_set_keep_ratio_changes_how_many_tokens_are_encoded(padded_batch):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    counts = {}
    for ratio in (0.1, 0.3, 0.5):
        model.set_keep_ratio(ratio)
        out, src, memory = encode(model, *padded_batch)
        counts[ratio] = changed_tokens(src, memory).sum(1)
        assert torch.equal(counts[ratio], out["selection"].counts)
    assert (counts[0.1] < counts[0.3]).all() and (counts[0.3] < counts[0.5]).all()
    assert model.config.model.keep_ratio == 0.3


def test_keep_ratio_one_encodes_every_valid_token(tiny_model, padded_batch):
    out, src, memory = encode(tiny_model, *padded_batch, keep_ratio=1.0)
    valid = ~out["layout"].padding_mask
    changed = changed_tokens(src, memory)
    # image 0 has no padding: every token; image 1: valid + 1 tokens (the count is int(valid * 1) + 1)
    assert changed[0].all() and changed[1].sum() == valid[1].sum() + 1
    # SPEC §9 quirk: padded tokens take the batch's minimum score, so a valid token holding that exact
    # minimum ties with them and may be left out; every other valid token is encoded
    above_min = out["token_scores"] > out["token_scores"].min()
    assert changed[valid & above_min].all()


def test_keep_ratio_zero_encodes_every_token_without_scores(tiny_model, padded_batch):
    out, src, memory = encode(tiny_model, *padded_batch, keep_ratio=0.0)
    assert changed_tokens(src, memory).all()
    assert "token_scores" not in out and "selection" not in out


def test_selecting_every_token_equals_the_dense_encoder():
    torch.manual_seed(0)
    d_model, levels = 32, 2
    encoder = SparseEncoder(lambda: EncoderLayer(d_model, 64, 0.0, levels, 4, 2), 2).double()
    layout = unpadded_layout([(4, 6), (2, 3)], batch=2)
    src, pos = (
        torch.randn(2, 30, d_model, dtype=torch.float64),
        torch.randn(2, 30, d_model, dtype=torch.float64),
    )
    dense, _ = encoder(src, pos, layout)
    everything = torch.stack([torch.randperm(30), torch.randperm(30)])
    sparse, _ = encoder(src, pos, layout, TokenSelection(everything, torch.tensor([30, 30])))
    torch.testing.assert_close(sparse, dense)


def test_batched_sparse_encoder_matches_an_image_by_image_loop():
    """Values are the full map, refreshed after every layer with the first count_i refined rows only."""
    torch.manual_seed(0)
    d_model, levels = 32, 2
    encoder = SparseEncoder(lambda: EncoderLayer(d_model, 64, 0.0, levels, 4, 2), 3).double()
    layout = unpadded_layout([(4, 6), (2, 3)], batch=2)
    src, pos = (
        torch.randn(2, 30, d_model, dtype=torch.float64),
        torch.randn(2, 30, d_model, dtype=torch.float64),
    )
    counts = torch.tensor([9, 4])
    selected = torch.stack([torch.randperm(30)[:9], torch.randperm(30)[:9]])
    batched, _ = encoder(src, pos, layout, TokenSelection(selected, counts))

    reference_points = encoder_reference_points(layout)
    for i in range(2):
        keep = selected[i, : counts[i]]
        memory, queries = src[i : i + 1].clone(), src[i : i + 1, keep]
        for layer in encoder.layers:
            queries = layer(queries, pos[i : i + 1, keep], reference_points[i : i + 1, keep], memory, layout.image(i))
            memory[0, keep] = queries[0]
        torch.testing.assert_close(batched[i], memory[0])


def test_keep_counts_and_selection():
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 25:] = True
    counts = keep_counts(mask, 0.3)
    assert counts.tolist() == [13, 8]
    scores = fill_padded_scores(torch.randn(2, 40), mask)
    selected = TokenSelection.top(scores, counts).indices
    assert selected.shape == (2, 13)
    assert not mask[1, selected[1, :8]].any()
    assert TokenSelection.top(scores, torch.tensor([41, 1])).indices.shape == (2, 40)


def test_scoring_network_mean_pools_half_its_channels():
    torch.manual_seed(0)
    net = ScoringNetwork(64)
    tokens = torch.randn(1, 10, 64)
    scores = net(tokens)
    assert scores.shape == (1, 10)
    # changing one token changes every other token's score only through the global half
    shifted = tokens.clone()
    shifted[0, 0] += 10
    assert not torch.equal(net(shifted)[0, 1:], scores[0, 1:])


def test_scoring_network_is_trained_only_by_the_scoring_loss(padded_batch):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).train()
    out = model(*padded_batch)
    detection = out["pred_logits"].sum() + out["pred_boxes"].sum()
    detection = detection + out["enc_outputs"]["pred_logits"].sum() + out["enc_outputs"]["pred_boxes"].sum()
    for aux in out["aux_outputs"] + out["enc_aux_outputs"]:
        detection = detection + aux["pred_logits"].sum() + aux["pred_boxes"].sum()
    detection.backward(retain_graph=True)
    scoring_params = list(model.transformer.enc_mask_predictor.parameters())
    assert all(p.grad is None or not p.grad.any() for p in scoring_params)
    assert model.input_proj[0][0].weight.grad.abs().sum() > 0
    out["token_scores"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scoring_params)


@pytest.mark.parametrize("criterion", ["oam", "random"])
def test_other_saliency_criteria_select_tokens(padded_batch, criterion):
    torch.manual_seed(0)
    config = apply_overrides(get_preset("tiny"), {"model.token_ranking": criterion})
    model = build_model(config).train()
    assert not hasattr(model.transformer, "enc_mask_predictor")
    out, src, memory = encode(model, *padded_batch)
    assert torch.equal(changed_tokens(src, memory).sum(1), out["selection"].counts)
    assert not (changed_tokens(src, memory) & out["layout"].padding_mask).any()
    if criterion == "oam":
        num_tokens = out["layout"].num_tokens
        assert out["backbone_outputs"]["pred_logits"].shape == (2, num_tokens, config.model.num_classes)
        assert out["backbone_outputs"]["pred_boxes"].shape == (2, num_tokens, 4)
        model.eval()
        assert "backbone_outputs" not in encode(model, *padded_batch)[0]
    else:
        assert "backbone_outputs" not in out


def test_keep_ratio_needs_a_scorer():
    model = build_model(apply_overrides(get_preset("tiny"), {"model.keep_ratio": 0.0}))
    with pytest.raises(ValueError, match="scorer"):
        model.set_keep_ratio(0.2)
    with pytest.raises(ValueError, match="keep_ratio"):
        model.set_keep_ratio(1.5)
