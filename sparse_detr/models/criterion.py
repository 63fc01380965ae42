"""Training objective of Deformable DETR and Sparse DETR (SPEC §6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from sparse_detr.config import TOKEN_RANKINGS, Config, LossConfig, ModelConfig
from sparse_detr.models.attention_map import attention_coverage, decoder_attention_map, fill_padded_tokens
from sparse_detr.models.matcher import HungarianMatcher
from sparse_detr.models.outputs import Detections, DetectorOutputs
from sparse_detr.models.token_layout import TokenSelection
from sparse_detr.models.token_targets import foreground_loss, foreground_targets, salience_loss, salience_targets
from sparse_detr.models.transformer import SCORING_NETWORK_RANKINGS

DETECTION_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")

Targets = list[dict[str, torch.Tensor]]
Indices = list[tuple[torch.Tensor, torch.Tensor]]

# loss_mask_prediction's weight per ranking, times loss.mask_prediction_coef (1, Sparse DETR's): each reference's
# own, Focus-DETR's 1.5 and Salience-DETR's 2. The three losses are normalized differently (BCE mean over all
# tokens; focal sums over positives), so one shared weight would favour whichever is largest; with each method's
# own weight the rankings differ only in what their authors trained, while every other loss stays the same.
SCORING_LOSS_SCALES = {"dam": 1.0, "foreground": 1.5, "salience": 2.0}


class SetCriterion(nn.Module):
    """Hungarian detection losses on every output set, plus the scoring network's loss.

    ``forward`` returns the unweighted losses and log-only metrics; ``weight_dict`` names the
    losses that are trained and their weights. Detection losses on the model's output sets:

    - ``pred_logits``/``pred_boxes`` (last decoder layer): ``loss_ce``, ``loss_bbox``, ``loss_giou``;
    - ``aux_outputs`` (earlier decoder layers): suffix ``_0``, ``_1``, ...;
    - ``enc_outputs`` (two-stage proposals): suffix ``_enc``;
    - ``enc_aux_outputs`` (sparse encoder aux heads): suffix ``_enc_0``, ``_enc_1``, ...;
    - ``backbone_outputs`` (OAM objectness head): suffix ``_backbone``.

    All of them are matched with the real class labels. With ``token_scores`` in the outputs,
    ``loss_mask_prediction`` trains the scoring network of the rankings that have one: ``"dam"`` to predict
    the tokens the decoder attends to most, ``"foreground"`` and ``"salience"`` the targets their
    papers' code makes from the boxes (:mod:`sparse_detr.models.token_targets`). Metrics: ``class_error``
    (last layer, in %) and, when tokens were selected (``selection``), ``dam_coverage`` and
    ``dam_coverage_level{l}``.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        token_ranking: str = "dam",
    ):
        super().__init__()
        if token_ranking not in TOKEN_RANKINGS:
            raise ValueError(f"token_ranking must be one of {TOKEN_RANKINGS}, got {token_ranking!r}")
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.token_ranking = token_ranking

    def loss_labels(self, outputs: Detections, targets: Targets, indices: Indices, num_boxes: float) -> torch.Tensor:
        """Sigmoid focal loss over the one-hot classes of all queries, / number of target boxes."""
        logits = outputs["pred_logits"]  # (N, Q, C)
        batch_index, query_index = _matched_queries(indices)
        one_hot = torch.zeros_like(logits)
        one_hot[batch_index, query_index, _matched_targets(targets, indices, "labels")] = 1
        loss = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=2.0, reduction="none")
        # mean over queries, then x Q: the reference's order of operations, kept for identical numbers
        return loss.mean(1).sum() / num_boxes * logits.shape[1]

    def loss_boxes(
        self, outputs: Detections, targets: Targets, indices: Indices, num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """L1 (cxcywh) and 1 - GIoU over the matched pairs, / number of target boxes."""
        boxes = outputs["pred_boxes"][_matched_queries(indices)]  # (num matched, 4)
        target_boxes = _matched_targets(targets, indices, "boxes").to(boxes.dtype)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        return {
            "loss_bbox": F.l1_loss(boxes, target_boxes, reduction="none").sum() / num_boxes,
            "loss_giou": (1 - torch.diag(giou)).sum() / num_boxes,
        }

    def detection_losses(
        self, outputs: Detections, targets: Targets, num_boxes: float, suffix: str = ""
    ) -> tuple[dict[str, torch.Tensor], Indices]:
        """Match one output set and return its three losses, named with ``suffix``, and the match."""
        device = outputs["pred_logits"].device
        indices = [(query.to(device), target.to(device)) for query, target in self.matcher(outputs, targets)]
        losses = {"loss_ce": self.loss_labels(outputs, targets, indices, num_boxes)}
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {name + suffix: value for name, value in losses.items()}, indices

    def loss_mask_prediction(
        self, token_scores: torch.Tensor, attention_map: torch.Tensor, keep_counts: torch.Tensor
    ) -> torch.Tensor:
        """Binary cross-entropy of the token scores against the top ``keep_counts[i]`` DAM tokens.

        Args:
            token_scores: (N, S) scoring network logits, padded tokens included.
            attention_map: (N, S) DAM with padded tokens filled below every other token.
            keep_counts: (N,) int64 number of selected tokens per image.

        Returns:
            Mean over all N·S tokens.
        """
        dam_selection = TokenSelection.top(attention_map, keep_counts)
        target = dam_selection.token_mask(attention_map.shape[1]).to(token_scores.dtype)
        return F.binary_cross_entropy_with_logits(token_scores, target)

    def forward(
        self, outputs: DetectorOutputs, targets: Targets, num_boxes: float | None = None, batch_share: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Compute every loss the outputs allow.

        Args:
            outputs: the model's output dict (see :class:`SetCriterion` for the keys used).
            targets: N dicts with ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) normalized cxcywh; the
                ``"foreground"`` and ``"salience"`` rankings also read ``size`` (2,) (h, w) of the resized image.
            num_boxes: the box count that normalizes the detection losses; default this batch's
                (averaged over processes, at least 1).
            batch_share: this batch's share of the images of one optimizer step; ``loss_mask_prediction``,
                normalized within the batch, is scaled by it. With gradient accumulation, ``num_boxes`` (the
                whole step's) and ``batch_share`` make the batches' losses add up to one large batch's (for
                ``"salience"``, divided by the batch's own count of positive tokens, nearly).

        Returns:
            Unweighted losses and metrics by name.
        """
        if num_boxes is None:
            num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses, indices = self.detection_losses(outputs, targets, num_boxes)
        losses["class_error"] = _class_error(outputs["pred_logits"], targets, indices)

        output_sets = [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            output_sets.append(("_enc", outputs["enc_outputs"]))
        output_sets += [(f"_enc_{i}", aux) for i, aux in enumerate(outputs.get("enc_aux_outputs", []))]
        if "backbone_outputs" in outputs:
            output_sets.append(("_backbone", outputs["backbone_outputs"]))
        for suffix, output_set in output_sets:
            losses.update(self.detection_losses(output_set, targets, num_boxes, suffix)[0])

        losses.update(self.token_losses(outputs, targets))
        if "loss_mask_prediction" in losses:
            losses["loss_mask_prediction"] = losses["loss_mask_prediction"] * batch_share
        return losses

    def token_losses(self, outputs: DetectorOutputs, targets: Targets) -> dict[str, torch.Tensor]:
        """``loss_mask_prediction`` (the scoring network's loss) and the DAM coverage of the selected tokens."""
        trains_scores = self.token_ranking in SCORING_NETWORK_RANKINGS and "token_scores" in outputs
        if not trains_scores and "selection" not in outputs:
            return {}
        missing = [key for key in _DAM_INPUTS if key not in outputs]
        if missing:
            raise KeyError(f"the decoder attention map needs {missing} in the model outputs")
        layout, selection = outputs["layout"], outputs["selection"]
        attention_map = decoder_attention_map(outputs["sampling_locations"], outputs["attention_weights"], layout)
        losses = {}
        if trains_scores:
            losses["loss_mask_prediction"] = self.scoring_loss(outputs, targets, attention_map)
        if "selection" in outputs:
            overall, per_level = attention_coverage(attention_map, selection, layout)
            losses["dam_coverage"] = overall.mean()
            losses.update({f"dam_coverage_level{level}": share for level, share in enumerate(per_level.mean(0))})
        return losses

    def scoring_loss(self, outputs: DetectorOutputs, targets: Targets, attention_map: torch.Tensor) -> torch.Tensor:
        """The scoring network's loss against the target of :attr:`token_ranking`.

        Args:
            outputs: with ``token_scores``, ``layout`` and ``selection``.
            targets: N dicts; the box rankings read ``boxes`` and ``size`` (see :meth:`forward`).
            attention_map: (N, S) the decoder attention map, the ``"dam"`` target.
        """
        scores, layout = outputs["token_scores"], outputs["layout"]
        if self.token_ranking == "dam":
            target_map = fill_padded_tokens(attention_map, layout.padding_mask)
            return self.loss_mask_prediction(scores, target_map, outputs["selection"].counts)
        if any("size" not in target for target in targets):
            raise KeyError(f"the {self.token_ranking} ranking needs each target's 'size' (h, w of the resized image)")
        boxes = [target["boxes"] for target in targets]
        image_sizes = torch.stack([target["size"] for target in targets])  # (N, 2)
        if self.token_ranking == "foreground":
            return foreground_loss(scores, foreground_targets(boxes, image_sizes, layout), layout.padding_mask)
        return salience_loss(scores, salience_targets(boxes, image_sizes, layout), layout.padding_mask)


_DAM_INPUTS = ("sampling_locations", "attention_weights", "layout", "selection")


def _matched_queries(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, query index) of every matched prediction, images concatenated."""
    batch_index = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)])
    query_index = torch.cat([query for query, _ in indices])
    return batch_index, query_index


def _matched_targets(targets: Targets, indices: Indices, key: str) -> torch.Tensor:
    """``key`` of the target matched to each matched prediction, in :func:`_matched_queries` order."""
    return torch.cat([t[key][target] for t, (_, target) in zip(targets, indices, strict=True)])


def average_num_boxes(targets: Targets, device: torch.device) -> float:
    """Target boxes per process (averaged over processes when distributed), at least 1: what normalizes the
    detection losses of a batch, or of an optimizer step's batches together."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1).item()


@torch.no_grad()
def _class_error(logits: torch.Tensor, targets: Targets, indices: Indices) -> torch.Tensor:
    """Top-1 error (%) of the matched predictions' classes; 100 when there is nothing to match."""
    labels = _matched_targets(targets, indices, "labels")
    if labels.numel() == 0:
        return torch.tensor(100.0, device=logits.device)
    predicted = logits[_matched_queries(indices)].argmax(-1)
    return 100.0 * (1 - (predicted == labels).float().mean())


def build_weight_dict(model_config: ModelConfig, loss_config: LossConfig) -> dict[str, float]:
    """Weights of exactly the losses a model built from ``model_config`` produces in training."""
    base = {
        "loss_ce": loss_config.cls_loss_coef,
        "loss_bbox": loss_config.bbox_loss_coef,
        "loss_giou": loss_config.giou_loss_coef,
    }
    sparse = model_config.is_sparse
    suffixes = [""]
    if model_config.aux_loss:
        suffixes += [f"_{i}" for i in range(model_config.dec_layers - 1)]
    if model_config.two_stage:
        suffixes.append("_enc")
    if model_config.use_enc_aux_loss:
        suffixes += [f"_enc_{i}" for i in range(model_config.enc_layers - 1)]
    if sparse and model_config.token_ranking == "oam":
        suffixes.append("_backbone")
    weight_dict = {name + suffix: weight for suffix in suffixes for name, weight in base.items()}
    if sparse and model_config.token_ranking in SCORING_NETWORK_RANKINGS:
        scale = SCORING_LOSS_SCALES[model_config.token_ranking]
        weight_dict["loss_mask_prediction"] = loss_config.mask_prediction_coef * scale
    return weight_dict


def build_criterion(config: Config) -> SetCriterion:
    """The criterion for a model built from ``config``."""
    loss = config.loss
    matcher = HungarianMatcher(
        cost_class=loss.set_cost_class,
        cost_bbox=loss.set_cost_bbox,
        cost_giou=loss.set_cost_giou,
        focal_alpha=loss.focal_alpha,
    )
    return SetCriterion(
        matcher,
        build_weight_dict(config.model, loss),
        focal_alpha=loss.focal_alpha,
        token_ranking=config.model.token_ranking,
    )
