"""Config files, --set overrides and their precedence: preset < file < --set < explicit options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparse_detr.config import get_preset
from sparse_detr.data.source import DataSource
from sparse_detr.engine import train_recipe
from sparse_detr.engine.run_config import (
    merged_settings,
    parse_set,
    read_config_file,
    resolve_run_config,
)
from sparse_detr.errors import ConfigError


def write(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_preset_file_set_options(tmp_path):
    path = write(
        tmp_path,
        'preset = "sparse-rho0.2"\n[model]\nkeep_ratio = 0.3\nnum_queries = 100\n'
        "[train]\nlr = 1e-4\nepochs = 10\nbatch_size = 3\n[loss]\ncls_loss_coef = 1\n",
    )
    settings = merged_settings(
        path, ["model.keep_ratio=0.4", "train.lr=5e-5"], {"train.lr": 1e-5, "model.dropout": None}
    )
    run = resolve_run_config(settings)
    model, train = run.config.model, run.train
    assert run.preset == "sparse-rho0.2" and model.two_stage and model.use_enc_aux_loss  # the preset
    assert model.num_queries == 100 and train.batch_size == 3 and run.config.loss.cls_loss_coef == 1.0  # file
    assert model.keep_ratio == 0.4  # --set over the file
    assert train.lr == 1e-5  # an explicit option over --set
    assert model.dropout == get_preset("sparse-rho0.2").model.dropout  # an unset option changes nothing
    # epochs without lr_drop: the recipe moves the drop to the same fraction of the run
    assert train.lr_drop == train_recipe("sparse-rho0.2", epochs=10).lr_drop == 8


def test_config_toml_reads_back_to_the_same_run(tmp_path):
    settings = merged_settings(None, ["preset=deformable-topk-bbr", "model.backbone=swin-t", "train.amp=bf16"])
    run = resolve_run_config({**settings, "data.root": str(tmp_path / "coco"), "train.iters_per_epoch": 5})
    path = write(tmp_path, run.to_toml(), "config.toml")
    again = resolve_run_config(read_config_file(path))
    assert again == run
    assert again.data == DataSource(root=str(tmp_path / "coco"))


def test_set_values_are_toml_or_plain_strings():
    assert parse_set("model.backbone=swin-t") == ("model.backbone", "swin-t")
    assert parse_set("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_set("model.two_stage=false") == ("model.two_stage", False)
    assert parse_set("train.backbone_names=['backbone.0', 'input_proj']") == (
        "train.backbone_names",
        ("backbone.0", "input_proj"),
    )
    assert parse_set(" model.keep_ratio = 1 ") == ("model.keep_ratio", 1.0)


@pytest.mark.parametrize(
    "item, message",
    [
        ("model.keep_rato=0.2", "--set unknown config key 'model.keep_rato'; known: backbone,"),
        ("optimizer.lr=1", "--set unknown table 'optimizer' in 'optimizer.lr'; tables: data, model, loss, train"),
        ("lr=1", "--set unknown key 'lr'; known: preset and the tables data, model, loss, train"),
        ("train.epochs=many", "--set train.epochs must be an integer, got 'many'"),
        ("model.keep_ratio", "--set expects key=value"),
        ("preset=3", "--set preset must be a string"),
    ],
)
def test_bad_set_items_name_the_key(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_set(item)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nlr = 'fast'\n", "run.toml: train.lr must be a number, got 'fast'"),
        ("[model]\nkeep_rato = 0.2\n", "run.toml: unknown config key 'model.keep_rato'; known:"),
        ("[optimizer]\nlr = 1\n", "run.toml: unknown key 'optimizer'"),
        ("model = 3\n", "run.toml: model must be a table ([model])"),
        ("[model]\n[model.sub]\nx = 1\n", "run.toml: [model] sub is a table"),
        ("[train\n", "run.toml is not valid TOML"),
    ],
)
def test_bad_config_files_name_the_file_table_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config_file(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*gone.toml"):
        read_config_file(tmp_path / "gone.toml")


def test_a_dataset_needs_a_preset_and_the_default_is_tiny():
    assert resolve_run_config({}).preset == "tiny"
    with pytest.raises(ConfigError, match="a dataset needs a model preset: pass --preset \\(one of deformable,"):
        resolve_run_config({"data.root": "/data/coco"})
    with pytest.raises(ConfigError, match="unknown preset 'sparse'"):
        resolve_run_config({"preset": "sparse"})
    base = get_preset("sparse-rho0.3")  # a fine-tuned checkpoint's architecture
    assert resolve_run_config({"data.root": "/data/coco"}, base).config == base


def test_a_higher_layer_data_folder_replaces_explicit_paths(tmp_path):
    path = write(tmp_path, '[data]\ntrain_images = "a"\ntrain_ann = "b"\nval_images = "c"\nval_ann = "d"\n')
    assert merged_settings(path, (), {"data.root": "/coco"}) == {"data.root": "/coco"}
    settings = merged_settings(write(tmp_path, '[data]\nroot = "/coco"\n', "b.toml"), ["data.val_images=x"])
    assert settings == {"data.val_images": "x"}


def test_data_sources(tmp_path):
    """A COCO folder, a synthetic folder, explicit paths (all four to train, the val pair to evaluate)."""
    assert DataSource().is_builtin
    with pytest.raises(ConfigError, match="either a COCO root"):
        DataSource(root="/coco", val_ann="x.json")
    with pytest.raises(ConfigError, match="give all of --train-images"):
        DataSource(val_images="v", val_ann="v.json").splits()
    assert DataSource(val_images="v", val_ann="v.json").val_split() == (Path("v"), Path("v.json"))
    with pytest.raises(ConfigError, match="give both --val-images and --val-ann"):
        DataSource(val_images="v").val_split()
    synth = tmp_path / "synth"
    synth.mkdir()
    (synth / "synthetic.json").write_text("{}")  # a folder of `sdetr data synth`
    assert DataSource(root=str(synth)).splits().val_ann == synth / "annotations" / "instances_val.json"
