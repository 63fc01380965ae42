"""Presets, overrides and serialization of the configuration."""

from __future__ import annotations

import json
import re

import pytest

from sparse_detr.config import (
    Config,
    ModelConfig,
    apply_overrides,
    check_field,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
)
from sparse_detr.errors import ConfigError


@pytest.mark.parametrize("backbone", ["r50", "swin-t"])
@pytest.mark.parametrize("name", [p for p in list_presets() if not p.startswith("tiny")])  # the paper's presets
def test_published_presets_follow_spec_table(name, backbone):
    model = get_preset(name, backbone).model
    assert model.backbone == backbone
    assert (model.hidden_dim, model.nheads, model.enc_layers, model.dec_layers) == (256, 8, 6, 6)
    assert (model.dim_feedforward, model.num_queries, model.num_classes) == (1024, 300, 91)
    if name == "deformable":
        assert not model.two_stage and not model.with_box_refine and model.keep_ratio == 0
    elif name == "deformable-topk-bbr":
        assert model.two_stage and model.with_box_refine and model.keep_ratio == 0 and not model.use_enc_aux_loss
    else:
        assert model.two_stage and model.with_box_refine and model.use_enc_aux_loss
        assert model.keep_ratio == float(name.removeprefix("sparse-rho"))
        assert model.token_ranking == "dam"


def test_sparse_presets_cover_rho_01_to_05():
    assert [p for p in list_presets() if p.startswith("sparse-rho")] == [f"sparse-rho0.{i}" for i in range(1, 6)]


def test_tiny_preset_runs_the_sparse_path_at_small_scale():
    model = get_preset("tiny").model
    assert model.backbone == "resnet10t"
    assert model.two_stage and model.with_box_refine and model.use_enc_aux_loss
    assert 0 < model.keep_ratio < 1 and model.hidden_dim <= 128 and model.num_queries <= 100


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="sparse-rho0.1") as error:
        get_preset("sparse-rho0.7")
    assert "sparse-rho0.7" in str(error.value)


def test_overrides_return_a_changed_copy():
    config = get_preset("sparse-rho0.1")
    changed = apply_overrides(
        config,
        {"model.keep_ratio": 0.3, "model.token_ranking": "oam", "loss.cls_loss_coef": 1.0, "name": "x"},
    )
    assert (changed.model.keep_ratio, changed.model.token_ranking) == (0.3, "oam")
    assert changed.loss.cls_loss_coef == 1.0 and changed.name == "x"
    assert config.model.keep_ratio == 0.1 and config.name == "sparse-rho0.1"


@pytest.mark.parametrize("key", ["model.keep_rato", "optimizer.lr", "model.keep_ratio.x", "nmae"])
def test_unknown_override_key_is_a_clear_error(key):
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(get_preset("tiny"), {key: 1})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.keep_ratio", "high", "model.keep_ratio must be a number, got 'high'"),
        ("model.num_queries", 2.5, "model.num_queries must be an integer"),
        ("model.two_stage", 1, "model.two_stage must be true or false"),
        ("model.backbone", 50, "model.backbone must be a string"),
    ],
)
def test_override_values_are_type_checked(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(get_preset("tiny"), {key: value})


def test_check_field_converts_and_names_the_source():
    converted = check_field(ModelConfig, "keep_ratio", 1)
    assert converted == 1.0 and isinstance(converted, float)
    with pytest.raises(ConfigError, match=r"^run.toml: \[model\] hidden_dim must be an integer, got 'x'$"):
        check_field(ModelConfig, "hidden_dim", "x", "[model] hidden_dim", "run.toml: ")


@pytest.mark.parametrize(
    "key, value",
    [("model.token_ranking", "objectness"), ("model.keep_ratio", 1.5), ("model.hidden_dim", 100)],
)
def test_invalid_values_are_rejected(key, value):
    with pytest.raises(ValueError, match=key.split(".")[1]):
        apply_overrides(get_preset("tiny"), {key: value})


@pytest.mark.parametrize("name", list_presets())
def test_dict_round_trip(name):
    config = get_preset(name, "swin-t")
    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(data) == config
    assert isinstance(config_from_dict(data), Config)


def test_from_dict_rejects_unknown_fields_and_fills_defaults():
    data = config_to_dict(get_preset("tiny"))
    data["model"]["typo"] = 1
    with pytest.raises(ConfigError, match="typo"):
        config_from_dict(data)
    assert config_from_dict({"name": "plain"}).model == get_preset("deformable").model


def test_checkpoints_with_the_old_field_name_still_read():
    data = config_to_dict(get_preset("sparse-rho0.1"))
    data["model"]["saliency_criterion"] = data["model"].pop("token_ranking")  # written before the rename
    assert config_from_dict(data) == get_preset("sparse-rho0.1")


def test_a_preset_registered_after_import_is_accepted_everywhere(monkeypatch, tmp_path):
    """The registry is read live: a preset a user registers after importing sparse_detr is a preset for the
    Python API, `sdetr train --preset` and sweep files alike."""
    from typer.testing import CliRunner

    from sparse_detr.ablation import Sweep
    from sparse_detr.cli import app
    from sparse_detr.config import presets as config_module

    def narrow_tiny() -> config_module.Preset:
        """tiny with 32 queries."""
        preset = config_module.create_preset("tiny")
        preset.config.model.num_queries = 32
        return config_module.Preset(Config("narrow-tiny", preset.config.model), preset.train)

    monkeypatch.setitem(config_module._REGISTRY, "narrow-tiny", narrow_tiny)
    assert "narrow-tiny" in list_presets() and get_preset("narrow-tiny").model.num_queries == 32
    assert Sweep(preset="narrow-tiny").preset == "narrow-tiny"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--preset", "narrow-tiny", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "num_queries = 32" in result.output


def test_the_amp_settings_config_allows_are_the_dtypes_autocast_knows():
    from sparse_detr.config import AMP_MODES
    from sparse_detr.utils.precision import AMP_DTYPES

    assert set(AMP_MODES) - {None} == set(AMP_DTYPES)
