"""One smoke test per registered preset: it builds, detects, trains a step's losses, and its recipe and
configuration survive the round trips a run makes."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_detr.config import config_from_dict, config_to_dict, create_preset, list_presets, train_recipe
from sparse_detr.engine.run_config import RunConfig, read_config_file, resolve_run_config
from sparse_detr.models import build_criterion, build_model, pad_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_detects_and_trains(name, tmp_path):
    preset = create_preset(name)
    config, recipe = preset.config, preset.train
    assert config.name == name and recipe == train_recipe(name) and recipe.output_dir == f"runs/{name}"
    assert config_from_dict(config_to_dict(config)) == config

    torch.manual_seed(0)
    model = build_model(config)
    generator = torch.Generator().manual_seed(0)
    # 128x160 and 96x192: enough tokens (426) for the 300 two-stage queries of the paper presets
    images, mask = pad_images(
        [torch.randn(3, 128, 160, generator=generator), torch.randn(3, 96, 192, generator=generator)]
    )
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
        {"labels": torch.tensor([3, 5]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.4, 0.3, 0.5]])},
    ]
    with torch.no_grad():
        losses = build_criterion(config)(model.train()(images, mask), targets)
        outputs = model.eval()(images, mask)
    model_config = config.model
    assert outputs["pred_logits"].shape == (2, model_config.num_queries, model_config.num_classes)
    assert outputs["pred_boxes"].shape == (2, model_config.num_queries, 4)
    assert ("selection" in outputs) == model_config.is_sparse
    weights = build_criterion(config).weight_dict
    assert set(weights) <= set(losses) and all(math.isfinite(float(losses[key])) for key in weights)

    run = resolve_run_config({"preset": name})
    path = tmp_path / "config.toml"
    path.write_text(RunConfig(config, recipe, run.data).to_toml())
    assert resolve_run_config(read_config_file(path)) == run
