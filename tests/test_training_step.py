"""One optimizer step of model + criterion for each token ranking (DAM, OAM, foreground, salience, random)."""

from __future__ import annotations

import pytest
import torch

from sparse_detr.config import TOKEN_RANKINGS, apply_overrides, get_preset
from sparse_detr.models import build_criterion, build_model, pad_images
from sparse_detr.models.transformer import SCORING_NETWORK_RANKINGS

# "size" (h, w of the resized image, as the dataset gives it) places the boxes for the box-supervised rankings
TARGETS = [
    {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
     "size": torch.tensor([96, 128])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "size": torch.tensor([80, 96])},
]  # fmt: skip


@pytest.mark.parametrize("token_ranking", TOKEN_RANKINGS)
def test_one_training_step(token_ranking):
    torch.manual_seed(0)
    config = apply_overrides(get_preset("tiny"), {"model.token_ranking": token_ranking})
    model = build_model(config).train()
    criterion = build_criterion(config)
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images(
        [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 80, 96, generator=generator)]
    )

    losses = criterion(model(images, mask), TARGETS)
    assert set(criterion.weight_dict) <= set(losses)
    assert any(k.endswith("_backbone") for k in losses) == (token_ranking == "oam")
    assert ("loss_mask_prediction" in losses) == (token_ranking in SCORING_NETWORK_RANKINGS)
    total = sum(criterion.weight_dict[k] * losses[k] for k in criterion.weight_dict)
    assert torch.isfinite(total)

    trained = model.transformer.oam_class_embed if token_ranking == "oam" else model.class_embed[0]
    before = [p.detach().clone() for p in trained.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trained.parameters()))

    selection = model.eval()(images, mask)["selection"]
    assert selection.indices.shape[1] == int(selection.counts.max())
