"""Hungarian matcher and the training objective (SPEC §6)."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.models.attention_map import decoder_attention_map
from sparse_detr.models.criterion import DETECTION_LOSSES, SetCriterion, build_criterion
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.token_layout import TokenLayout, TokenSelection

NUM_CLASSES = 5


def target(labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
    }


def random_output_set(n: int, num_queries: int, generator: torch.Generator, requires_grad: bool = False):
    logits = torch.randn(n, num_queries, NUM_CLASSES, generator=generator, dtype=torch.float64)
    centres = torch.rand(n, num_queries, 2, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    sizes = torch.rand(n, num_queries, 2, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    return {
        "pred_logits": logits.requires_grad_(requires_grad),
        "pred_boxes": torch.cat([centres, sizes], -1).requires_grad_(requires_grad),
    }


def sparse_like_outputs(
    dec_layers: int = 3, enc_layers: int = 3, oam: bool = False, requires_grad: bool = False, seed: int = 0
):
    """A hand-made output dict with every key a sparse preset returns in training (2 images, 2 levels)."""
    generator = torch.Generator().manual_seed(seed)
    n, num_queries, heads, points = 2, 4, 2, 2
    level_masks = [torch.zeros(n, 4, 6, dtype=torch.bool), torch.zeros(n, 2, 3, dtype=torch.bool)]
    level_masks[0][1, -1] = level_masks[1][1, -1] = True  # image 1: the last row of each level padded
    layout = TokenLayout.of(level_masks)
    num_tokens = 30
    assert layout.padding_mask[1, 18:24].all() and layout.padding_mask[1, 27:30].all()
    assert layout.padding_mask.sum() == 9
    scores = torch.randn(n, num_tokens, generator=generator, dtype=torch.float64)
    best_valid = scores.masked_fill(layout.padding_mask, -math.inf).topk(4, dim=1).indices
    outputs = random_output_set(n, num_queries, generator, requires_grad)
    outputs |= {
        "aux_outputs": [random_output_set(n, num_queries, generator, requires_grad) for _ in range(dec_layers - 1)],
        "enc_outputs": random_output_set(n, num_tokens, generator, requires_grad),
        "enc_aux_outputs": [random_output_set(n, 4, generator, requires_grad) for _ in range(enc_layers - 1)],
        "token_scores": scores.requires_grad_(requires_grad),
        "selection": TokenSelection(best_valid, torch.tensor([4, 3])),
        "sampling_locations": torch.rand(
            n, dec_layers, num_queries, heads, 2, points, 2, generator=generator, dtype=torch.float64
        ).requires_grad_(requires_grad),
        "attention_weights": torch.rand(
            n, dec_layers, num_queries, heads, 2, points, generator=generator, dtype=torch.float64
        ).requires_grad_(requires_grad),
        "layout": layout,
    }
    if oam:
        outputs["backbone_outputs"] = random_output_set(n, num_tokens, generator, requires_grad)
    return outputs


TARGETS = [
    target([1, 3], [[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.2]]),
    target([2], [[0.5, 0.5, 0.4, 0.4]]),
]


def make_criterion(token_ranking: str = "dam") -> SetCriterion:
    return SetCriterion(HungarianMatcher(), weight_dict={}, token_ranking=token_ranking)


# ---------------------------------------------------------------- matcher


def test_matcher_finds_the_obvious_assignment():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.full((1, 3, NUM_CLASSES), -5.0)
    logits[0, 0, 1] = logits[0, 2, 4] = 5.0
    targets = [{"labels": torch.tensor([4, 1]), "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])}]
    ((queries, matched_targets),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert dict(zip(queries.tolist(), matched_targets.tolist())) == {0: 1, 2: 0}
    assert queries.dtype == matched_targets.dtype == torch.int64


def test_matcher_class_cost_breaks_box_ties():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.full((1, 2, NUM_CLASSES), -5.0)
    logits[0, 1, 3] = 5.0
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    ((queries, _),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert queries.tolist() == [1]


def test_matcher_handles_an_image_without_targets():
    generator = torch.Generator().manual_seed(0)
    outputs = random_output_set(3, 6, generator)
    targets = [TARGETS[0], target([], []), TARGETS[1]]
    indices = HungarianMatcher()(outputs, targets)
    assert [len(q) for q, _ in indices] == [2, 0, 1]
    assert sorted(indices[0][1].tolist()) == [0, 1]
    empty = HungarianMatcher()(outputs, [target([], [])] * 3)
    assert all(len(q) == len(t) == 0 for q, t in empty)


# ---------------------------------------------------------------- detection losses


def focal(prob: float, positive: bool, alpha: float = 0.25) -> float:
    if positive:
        return -alpha * (1 - prob) ** 2 * math.log(prob)
    return -(1 - alpha) * prob**2 * math.log(1 - prob)


def test_unweighted_values_match_a_hand_computation():
    # one image, two queries, three classes, one target matched to query 0 (its box is much closer)
    logits = torch.tensor([[[0.5, -1.0, 2.0], [-0.3, 0.1, -2.0]]], dtype=torch.float64)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.9, 0.1, 0.1]]], dtype=torch.float64)
    targets = [target([2], [[0.55, 0.5, 0.2, 0.2]])]
    losses = make_criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)

    probs = torch.sigmoid(logits)[0].tolist()
    expected_ce = sum(focal(p, positive=(q, c) == (0, 2)) for q, row in enumerate(probs) for c, p in enumerate(row))
    # xyxy: prediction (0.4, 0.4, 0.6, 0.6), target (0.45, 0.4, 0.65, 0.6): intersection 0.03,
    # union 0.05, IoU 0.6; the enclosing box (0.25 x 0.2) equals the union, so GIoU = IoU
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-12)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, rel=1e-9)
    assert losses["loss_giou"].item() == pytest.approx(0.4, rel=1e-9)
    assert losses["class_error"].item() == 0.0


def test_losses_are_divided_by_the_number_of_target_boxes():
    generator = torch.Generator().manual_seed(1)
    outputs = random_output_set(2, 6, generator)
    criterion = make_criterion()
    losses = criterion(outputs, TARGETS)
    indices = criterion.matcher(outputs, TARGETS)
    one_hot = torch.zeros_like(outputs["pred_logits"])
    l1 = 0.0
    for i, (queries, matched) in enumerate(indices):
        one_hot[i, queries, TARGETS[i]["labels"][matched]] = 1
        l1 += (outputs["pred_boxes"][i, queries] - TARGETS[i]["boxes"][matched]).abs().sum().item()
    probs = outputs["pred_logits"].sigmoid()
    expected_ce = sum(focal(p, bool(t)) for p, t in zip(probs.flatten().tolist(), one_hot.flatten().tolist()))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce / 3, rel=1e-12)
    assert losses["loss_bbox"].item() == pytest.approx(l1 / 3, rel=1e-12)


def test_image_without_targets_trains_as_background():
    generator = torch.Generator().manual_seed(2)
    outputs = random_output_set(2, 5, generator, requires_grad=True)
    losses = make_criterion()(outputs, [TARGETS[1], target([], [])])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_ce"].backward()
    assert outputs["pred_logits"].grad[1].abs().sum() > 0  # pushed towards background

    all_empty = make_criterion()(random_output_set(2, 5, generator), [target([], [])] * 2)
    assert all_empty["loss_bbox"].item() == all_empty["loss_giou"].item() == 0.0
    assert all_empty["loss_ce"].item() > 0  # divided by max(num boxes, 1)


# ---------------------------------------------------------------- output sets, names, weights


def expected_names(dec_layers: int, enc_layers: int, backbone: bool, mask_prediction: bool) -> set[str]:
    suffixes = ["", *(f"_{i}" for i in range(dec_layers - 1)), "_enc", *(f"_enc_{i}" for i in range(enc_layers - 1))]
    suffixes += ["_backbone"] if backbone else []
    names = {name + suffix for name in DETECTION_LOSSES for suffix in suffixes}
    return names | ({"loss_mask_prediction"} if mask_prediction else set())


COVERAGE_METRICS = {"class_error", "dam_coverage", "dam_coverage_level0", "dam_coverage_level1"}


@pytest.mark.parametrize(
    ("token_ranking", "oam_outputs", "mask_prediction"),
    [("dam", False, True), ("oam", True, False), ("random", False, False)],
)
def test_loss_names_for_sparse_outputs(token_ranking, oam_outputs, mask_prediction):
    outputs = sparse_like_outputs(dec_layers=6, enc_layers=6, oam=oam_outputs)
    losses = make_criterion(token_ranking)(outputs, TARGETS)
    assert set(losses) == expected_names(6, 6, oam_outputs, mask_prediction) | COVERAGE_METRICS


def test_no_mask_prediction_loss_without_token_scores():
    outputs = sparse_like_outputs()
    for key in ("token_scores", "selection"):
        del outputs[key]
    losses = make_criterion("dam")(outputs, TARGETS)
    assert set(losses) == expected_names(3, 3, backbone=False, mask_prediction=False) | {"class_error"}


def test_missing_attention_inputs_is_a_clear_error():
    outputs = sparse_like_outputs()
    del outputs["sampling_locations"]
    with pytest.raises(KeyError, match="sampling_locations"):
        make_criterion("dam")(outputs, TARGETS)


def test_every_output_set_is_matched_with_real_labels():
    # the encoder output set is exactly the last layer's: equal losses prove the same (real) labels
    outputs = sparse_like_outputs()
    outputs["enc_outputs"] = {k: outputs[k] for k in ("pred_logits", "pred_boxes")}
    outputs["enc_aux_outputs"] = [outputs["enc_outputs"]]
    losses = make_criterion()(outputs, TARGETS)
    for name in DETECTION_LOSSES:
        assert losses[name + "_enc"].item() == losses[name + "_enc_0"].item() == losses[name].item()


WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask_prediction": 1.0}


def suffixed(*suffixes: str) -> set[str]:
    return {name + suffix for name in DETECTION_LOSSES for suffix in suffixes}


@pytest.mark.parametrize(
    ("preset", "overrides", "expected"),
    [
        ("deformable", {}, suffixed("", "_0", "_1", "_2", "_3", "_4")),
        ("deformable", {"model.aux_loss": False}, suffixed("")),
        ("deformable-topk-bbr", {}, suffixed("", "_0", "_1", "_2", "_3", "_4", "_enc")),
        ("sparse-rho0.1", {}, expected_names(6, 6, backbone=False, mask_prediction=True)),
        ("sparse-rho0.3", {"model.token_ranking": "oam"}, expected_names(6, 6, True, False)),
        ("sparse-rho0.5", {"model.token_ranking": "random"}, expected_names(6, 6, False, False)),
        ("tiny", {}, expected_names(3, 3, backbone=False, mask_prediction=True)),
    ],
)
def test_build_criterion_weights_exactly_the_losses_of_the_config(preset, overrides, expected):
    config = apply_overrides(get_preset(preset), overrides)
    criterion = build_criterion(config)
    assert set(criterion.weight_dict) == expected
    for name, weight in criterion.weight_dict.items():
        assert weight == next(w for base, w in WEIGHTS.items() if name.startswith(base))
    assert criterion.token_ranking == config.model.token_ranking


def test_build_criterion_takes_coefficients_from_the_loss_config():
    overrides = {"loss.cls_loss_coef": 1.5, "loss.mask_prediction_coef": 0.5, "loss.set_cost_bbox": 3.0}
    criterion = build_criterion(apply_overrides(get_preset("sparse-rho0.1"), overrides))
    assert criterion.weight_dict["loss_ce_enc_2"] == 1.5
    assert criterion.weight_dict["loss_mask_prediction"] == 0.5
    assert criterion.matcher.cost_bbox == 3.0


def test_weight_dict_covers_every_loss_produced():
    outputs = sparse_like_outputs(dec_layers=6, enc_layers=6)
    criterion = build_criterion(get_preset("sparse-rho0.1"))
    losses = criterion(outputs, TARGETS)
    assert set(criterion.weight_dict) == {name for name in losses if name.startswith("loss_")}


# ---------------------------------------------------------------- scoring network loss and coverage


def test_mask_prediction_loss_matches_a_hand_computation():
    outputs = sparse_like_outputs()
    losses = make_criterion()(outputs, TARGETS)
    dam = decoder_attention_map(outputs["sampling_locations"], outputs["attention_weights"], outputs["layout"])
    dam = dam.masked_fill(outputs["layout"].padding_mask, dam.min() - 1)
    expected = 0.0
    for i, count in enumerate(outputs["selection"].counts.tolist()):
        top = set(dam[i].argsort(descending=True)[:count].tolist())
        for token, score in enumerate(outputs["token_scores"][i].tolist()):
            p = 1 / (1 + math.exp(-score))
            expected -= math.log(p) if token in top else math.log(1 - p)
    assert losses["loss_mask_prediction"].item() == pytest.approx(expected / dam.numel(), rel=1e-12)


def test_mask_prediction_loss_trains_only_the_token_scores():
    outputs = sparse_like_outputs(requires_grad=True)
    losses = make_criterion()(outputs, TARGETS)
    losses["loss_mask_prediction"].backward()
    assert outputs["token_scores"].grad is not None and outputs["token_scores"].grad.abs().sum() > 0
    others = [outputs["sampling_locations"], outputs["attention_weights"], outputs["pred_logits"]]
    others += [outputs["enc_outputs"]["pred_boxes"], outputs["aux_outputs"][0]["pred_logits"]]
    assert all(tensor.grad is None for tensor in others)


def test_detection_losses_do_not_reach_the_token_scores():
    outputs = sparse_like_outputs(requires_grad=True)
    losses = make_criterion()(outputs, TARGETS)
    sum(v for k, v in losses.items() if k.startswith("loss_") and k != "loss_mask_prediction").backward()
    assert outputs["token_scores"].grad is None


def test_dam_coverage_matches_a_hand_computation():
    outputs = sparse_like_outputs()
    losses = make_criterion()(outputs, TARGETS)
    dam = decoder_attention_map(outputs["sampling_locations"], outputs["attention_weights"], outputs["layout"])
    overall, level0, level1 = [], [], []
    for i, count in enumerate(outputs["selection"].counts.tolist()):
        kept = outputs["selection"].indices[i, :count]
        on_kept = torch.zeros(30, dtype=torch.bool)
        on_kept[kept] = True
        overall.append(dam[i, on_kept].sum() / dam[i].sum())
        level0.append(dam[i, :24][on_kept[:24]].sum() / dam[i, :24].sum())
        level1.append(dam[i, 24:][on_kept[24:]].sum() / dam[i, 24:].sum())
    assert losses["dam_coverage"].item() == pytest.approx(torch.stack(overall).mean().item(), rel=1e-12)
    assert losses["dam_coverage_level0"].item() == pytest.approx(torch.stack(level0).mean().item(), rel=1e-12)
    assert losses["dam_coverage_level1"].item() == pytest.approx(torch.stack(level1).mean().item(), rel=1e-12)


def test_dam_coverage_is_one_when_every_token_is_selected():
    outputs = sparse_like_outputs()
    outputs["selection"] = TokenSelection(torch.stack([torch.randperm(30), torch.randperm(30)]), torch.tensor([30, 30]))
    losses = make_criterion("random")(outputs, TARGETS)
    for name in ("dam_coverage", "dam_coverage_level0", "dam_coverage_level1"):
        assert losses[name].item() == pytest.approx(1.0, rel=1e-12)
