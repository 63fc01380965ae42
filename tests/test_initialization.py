"""Fine-tuning: a new run starts from a checkpoint's weights; class rows follow the category names."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_model

from sparse_detr.checkpoint import save_checkpoint
from sparse_detr.config import apply_overrides, get_preset
from sparse_detr.engine.initialization import (
    InitialWeights,
    init_from_checkpoint,
    init_model_config,
    resolve_initial_weights,
)
from sparse_detr.models import build_model
from sparse_detr.utils.io import file_sha256

SHAPE_NAMES = {1: "circle", 2: "square", 3: "triangle", 4: "star", 5: "ring", 6: "cross"}


def tiny(num_classes: int, seed: int, **changes):
    return tiny_model({"model.num_classes": num_classes, **changes}, seed)


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory):
    """(model, path): a tiny 7-class run checkpoint that stores its categories (labels 1..6)."""
    model = tiny(7, seed=1)
    categories = {label: {"id": label, "name": name} for label, name in SHAPE_NAMES.items()}
    path = save_checkpoint(tmp_path_factory.mktemp("init") / "checkpoint.pth", model, categories=categories)
    return model, path


def class_heads(state):
    return {key: value for key, value in state.items() if "class_embed" in key}


def test_other_classes_carry_rows_by_name_and_reinitialize_the_rest(shapes_checkpoint):
    source, path = shapes_checkpoint
    model = tiny(4, seed=2)
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    report = init_from_checkpoint(model, path, {1: "Triangle", 2: "hexagon", 3: "star"})

    state, stored = model.state_dict(), source.state_dict()
    heads = class_heads(state)
    assert sorted(report.class_heads) == sorted(heads) and heads
    assert report.carried_classes == ["Triangle", "star"] and report.new_classes == ["hexagon"]
    for key, value in heads.items():
        torch.testing.assert_close(value[1], stored[key][3], rtol=0, atol=0)  # triangle
        torch.testing.assert_close(value[3], stored[key][4], rtol=0, atol=0)  # star
        for label in (0, 2):  # no such category in the checkpoint: the model's own initialization
            torch.testing.assert_close(value[label], fresh[key][label], rtol=0, atol=0)
    for key, value in state.items():
        if key not in heads:
            assert torch.equal(value, stored[key]), key
    assert sorted(report.loaded) == sorted(set(state) - set(heads)) and not report.skipped
    text = "\n".join(report.lines("ckpt"))
    assert "rows carried over by name: Triangle, star" in text and "loaded" in text


def test_the_same_classes_load_as_they_are(shapes_checkpoint):
    source, path = shapes_checkpoint
    model = tiny(7, seed=3)
    report = init_from_checkpoint(model, path, SHAPE_NAMES)
    assert not report.class_heads and not report.skipped and not report.not_in_checkpoint
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_another_architecture_loads_what_fits(shapes_checkpoint):
    _, path = shapes_checkpoint
    model = tiny(7, seed=4, **{"model.dec_layers": 2, "model.dim_feedforward": 96})
    report = init_from_checkpoint(model, path, SHAPE_NAMES)
    assert any(key.startswith("transformer.decoder.layers.2.") for key in report.skipped)  # not in the model
    assert any("linear1" in key for key in report.skipped)  # another shape
    assert any(key.startswith("backbone.") for key in report.loaded)
    assert "skipped" in "\n".join(report.lines("ckpt"))


def test_a_released_coco_checkpoint_carries_coco_names(tmp_path):
    """A released file (official layout, 91 COCO slots, no stored names) fine-tuned on person/dog."""
    source = tiny(91, seed=5)
    model_config = source.config.model
    args = argparse.Namespace(backbone=model_config.backbone, **{
        name: getattr(model_config, name)
        for name in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout",
                     "num_feature_levels", "enc_n_points", "dec_n_points", "num_queries", "two_stage",
                     "with_box_refine", "use_enc_aux_loss", "aux_loss")
    }, rho=model_config.keep_ratio)  # fmt: skip
    path = tmp_path / "released.pth"
    torch.save({"model": source.state_dict(), "args": args}, path)
    assert init_model_config(str(path)).model.num_classes == 91

    model = build_model(apply_overrides(init_model_config(str(path)), {"model.num_classes": 3}))
    report = init_from_checkpoint(model, path, {1: "person", 2: "dog"})
    assert report.carried_classes == ["person", "dog"]
    for key, value in class_heads(model.state_dict()).items():
        torch.testing.assert_close(value[2], source.state_dict()[key][18], rtol=0, atol=0)  # COCO id of dog


def test_initial_weights_of_a_fine_tuning_run_record_the_file(shapes_checkpoint):
    _, path = shapes_checkpoint
    weights = resolve_initial_weights(get_preset("tiny"), init=str(path.parent))  # a run folder, the same backbone
    assert weights.backbone is None and weights.checkpoint.file == path
    record = {"source": str(path.parent), "file": str(path), "sha256": file_sha256(path), "with_backbone": True}
    assert weights.to_dict()["init"] == record
    assert resolve_initial_weights(get_preset("tiny")) == InitialWeights()  # tiny learns from scratch
