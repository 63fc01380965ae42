"""The checkpoint zoo: the registry of released files, their checked download into the cache (served from
``file://`` links, no network) and what a ``--checkpoint`` value resolves to."""

from __future__ import annotations

import dataclasses
import os
import re
import time
import urllib.error

import pytest
import torch
from conftest import save_tiny_checkpoint
from test_checkpoint import official_args, official_state_dict, perturbed

from sparse_detr import zoo
from sparse_detr.checkpoint import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, OFFICIAL_ARGS
from sparse_detr.config import Config, ModelConfig, get_preset, list_presets
from sparse_detr.models.detector import build_model
from sparse_detr.utils.cache import user_cache_dir
from sparse_detr.zoo import load_model

# a released-like entry of a small architecture, so that fetching and checking it takes a moment
SMALL = zoo.ZooEntry("small-rho0.2", "small_20.pth", "tiny", "resnet10t", "imagenet", 0.2, 0.0, 0.0, 0.0, 0.0)


def test_registry_names_files_presets_and_backbones_agree():
    assert len(zoo.ZOO) == 15
    for name, entry in zoo.ZOO.items():
        tag, percent = re.fullmatch(r"sparse_detr_(r50|swint|r50_scrl)_(10|20|30|40|50)\.pth", entry.file_name).groups()
        keep_ratio = int(percent) / 100
        assert name == entry.name == f"sparse-detr-{tag.replace('_', '-')}-rho{keep_ratio}"
        assert entry.keep_ratio == keep_ratio
        assert entry.preset == f"sparse-rho{keep_ratio}" and entry.preset in list_presets()
        assert entry.backbone == ("swin-t" if tag == "swint" else "r50")
        assert entry.backbone_init == ("scrl" if tag == "r50_scrl" else "imagenet")
        assert entry.url == zoo.RELEASE_URL + entry.file_name


def test_registry_numbers_are_the_readme_ones():
    assert zoo.ZOO["sparse-detr-r50-rho0.1"] == zoo.ZooEntry(
        "sparse-detr-r50-rho0.1",
        "sparse_detr_r50_10.pth",
        "sparse-rho0.1",
        "r50",
        "imagenet",
        0.1,
        45.3,
        40.9,
        105.4,
        26.5,
    )
    swint = zoo.ZOO["sparse-detr-swint-rho0.5"]
    assert (swint.ap, swint.params_m, swint.gflops, swint.fps) == (49.3, 41.4, 143.7, 17.2)
    scrl, r50 = zoo.ZOO["sparse-detr-r50-scrl-rho0.3"], zoo.ZOO["sparse-detr-r50-rho0.3"]
    assert scrl.ap == 47.4 and (scrl.params_m, scrl.gflops, scrl.fps) == (r50.params_m, r50.gflops, r50.fps)


def test_mirror_url_and_cache_folder_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SDETR_ZOO_URL", "https://mirror.example/zoo/")
    assert zoo.ZOO["sparse-detr-swint-rho0.2"].url == "https://mirror.example/zoo/sparse_detr_swint_20.pth"
    monkeypatch.setenv("SDETR_ZOO_URL", "file:///srv/zoo")
    assert zoo.ZOO["sparse-detr-swint-rho0.2"].url == "file:///srv/zoo/sparse_detr_swint_20.pth"

    monkeypatch.delenv("SDETR_ZOO_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.zoo_dir() == tmp_path / "xdg" / "sparse_detr" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "sparse_detr"
    monkeypatch.setenv("SDETR_ZOO_DIR", str(tmp_path / "zoo"))
    assert zoo.zoo_dir() == tmp_path / "zoo"


@pytest.fixture(scope="module")
def small_model():
    """A model of the architecture that an official file with ``official_args`` of it describes."""
    tiny = get_preset("tiny").model
    model = ModelConfig(backbone="resnet10t", keep_ratio=0.2, **{name: getattr(tiny, name) for name in OFFICIAL_ARGS})
    return perturbed(build_model(Config(name="official", model=model)))


@pytest.fixture
def mirror(tmp_path, monkeypatch, small_model):
    """A ``file://`` mirror serving SMALL's official file, and an empty cache: (mirror folder, cache)."""
    folder, cache = tmp_path / "mirror", tmp_path / "cache"
    folder.mkdir()
    torch.save({"model": small_model.state_dict(), "args": official_args(small_model.config)}, folder / SMALL.file_name)
    monkeypatch.setenv("SDETR_ZOO_URL", folder.as_uri())
    monkeypatch.setenv("SDETR_ZOO_DIR", str(cache))
    monkeypatch.setitem(zoo.ZOO, SMALL.name, SMALL)
    return folder, cache


@pytest.fixture
def downloads(monkeypatch):
    """The URLs torch.hub downloads from, in order."""
    urls = []
    download = torch.hub.download_url_to_file

    def counting(url, dst, **kwargs):
        urls.append(url)
        download(url, dst, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", counting)
    return urls


def test_fetch_downloads_once_into_the_cache(mirror, downloads, small_model, library_lines):
    folder, cache = mirror
    path = zoo.fetch_checkpoint(SMALL.name, progress=False)
    messages = library_lines()
    record = SMALL.file_name + zoo.RECORD_SUFFIX
    assert path == cache / SMALL.file_name and sorted(os.listdir(cache)) == [SMALL.file_name, record]  # no temp file
    assert downloads == [SMALL.url] and messages == [f"downloading {SMALL.name} from {SMALL.url} to {path}"]
    model = load_model(path)
    assert model.config == small_model.config
    for key, value in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    (folder / SMALL.file_name).unlink()
    assert zoo.fetch_checkpoint(SMALL.name, progress=False) == path and len(downloads) == 1
    assert zoo.zoo_table().set_index("name").loc[SMALL.name, "cached"]


@pytest.mark.parametrize(
    ("entry", "served", "message"),
    [
        (
            SMALL,
            b"<html>not found</html>",
            r"is not the released checkpoint small-rho0\.2: the download is not a PyTorch",
        ),
        (
            dataclasses.replace(SMALL, keep_ratio=0.3),
            None,
            "holds a resnet10t model with keep ratio 0.2, not resnet10t with 0.3",
        ),
        (
            dataclasses.replace(SMALL, backbone="r50"),
            None,
            "holds a resnet10t model with keep ratio 0.2, not r50 with 0.2",
        ),
    ],
    ids=["not-a-checkpoint", "other-keep-ratio", "other-backbone"],
)
def test_a_download_that_is_not_the_release_is_refused_and_deleted(mirror, monkeypatch, entry, served, message):
    folder, cache = mirror
    monkeypatch.setitem(zoo.ZOO, SMALL.name, entry)
    if served is not None:
        (folder / SMALL.file_name).write_bytes(served)
    with pytest.raises(ValueError, match=re.escape(entry.url) + ".*" + message):
        zoo.fetch_checkpoint(SMALL.name, progress=False)
    assert os.listdir(cache) == []


def test_temp_files_of_killed_downloads_are_cleaned(mirror, monkeypatch):
    _, cache = mirror

    def killed(url, dst, **kwargs):
        with open(f"{dst}.0123.partial", "wb") as partial:
            partial.write(b"half a file")
        raise KeyboardInterrupt

    download = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        zoo.fetch_checkpoint(SMALL.name, progress=False)
    # a hard kill leaves temp files like this one (here torch.hub's partial file), never the final name
    (partial,) = os.listdir(cache)
    assert partial.startswith(f".{SMALL.file_name}.") and partial.endswith(".partial")
    in_progress = cache / f".{SMALL.file_name}.another.tmp"  # a concurrent download's: recent, kept
    in_progress.touch()
    stale = time.time() - zoo.STALE_DOWNLOAD_SECONDS - 1
    os.utime(cache / partial, (stale, stale))

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    zoo.fetch_checkpoint(SMALL.name, progress=False)
    assert sorted(os.listdir(cache)) == sorted([SMALL.file_name, SMALL.file_name + zoo.RECORD_SUFFIX, in_progress.name])


@pytest.mark.parametrize("failure", ["missing-file-link", "no-network", "http-404"])
def test_download_failures_are_one_line_naming_the_link_and_the_alternative(mirror, monkeypatch, tmp_path, failure):
    _, cache = mirror
    if failure == "missing-file-link":
        monkeypatch.setenv("SDETR_ZOO_URL", (tmp_path / "nowhere").as_uri())
        reason = "No such file or directory"
    else:
        error = (
            urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            if failure == "no-network"
            else urllib.error.HTTPError(SMALL.url, 404, "Not Found", {}, None)
        )
        reason = "Temporary failure in name resolution" if failure == "no-network" else "HTTP 404 Not Found"

        def failing(url, dst, **kwargs):
            raise error

        monkeypatch.setattr(torch.hub, "download_url_to_file", failing)
    with pytest.raises(zoo.CheckpointUnavailableError) as raised:
        zoo.fetch_checkpoint(SMALL.name, progress=False)
    message = str(raised.value)
    assert "\n" not in message and isinstance(raised.value, RuntimeError)
    assert message.startswith(f"cannot download the zoo checkpoint {SMALL.name} from {SMALL.url} (")
    assert reason in message and message.endswith("pass its path instead of the name (--checkpoint FILE, --init FILE)")
    assert os.listdir(cache) == []


def test_resolve_checkpoint_files_run_folders_and_zoo_names(mirror, downloads, tmp_path, monkeypatch):
    _, cache = mirror
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "run" / CHECKPOINT_NAME
    own.parent.mkdir()
    own.write_bytes(b"not read")
    assert zoo.resolve_checkpoint(own) == own
    assert zoo.resolve_checkpoint("run").resolve() == own
    assert zoo.resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / CHECKPOINT_NAME
    assert zoo.resolve_checkpoint(SMALL.name) == cache / SMALL.file_name and downloads == [SMALL.url]
    assert zoo.resolve_checkpoint(SMALL.name) == cache / SMALL.file_name and len(downloads) == 1

    (tmp_path / SMALL.name).write_bytes(b"a local file")  # a local file wins over the zoo
    assert zoo.resolve_checkpoint(SMALL.name).resolve() == tmp_path / SMALL.name and len(downloads) == 1


def test_load_model_takes_a_file_a_run_folder_or_a_zoo_name(mirror, downloads, tmp_path, monkeypatch):
    """One load_model for what every --checkpoint takes: a run folder gives its best checkpoint (its last
    with last=True, or when it has no best one yet), a zoo name its cached download."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    save_tiny_checkpoint(run / CHECKPOINT_NAME, keep_ratio=0.3)
    assert zoo.load_model(run).keep_ratio == pytest.approx(0.3)  # no best one yet: the last
    save_tiny_checkpoint(run / BEST_CHECKPOINT_NAME, keep_ratio=0.2)
    assert zoo.load_model(run).keep_ratio == pytest.approx(0.2)
    assert zoo.load_model("run", last=True).keep_ratio == pytest.approx(0.3)
    assert zoo.load_model(run / CHECKPOINT_NAME).keep_ratio == pytest.approx(0.3)
    model = zoo.load_model(SMALL.name)
    assert not model.training and downloads == [SMALL.url]
    assert model.config.model.keep_ratio == pytest.approx(SMALL.keep_ratio)


@pytest.mark.parametrize(
    ("spec", "guess"),
    [
        ("sparse-detr-r50-rho0.6", "did you mean sparse-detr-r50-rho0.4 or sparse-detr-r50-rho0.5? "),
        ("empty-folder", ""),
    ],
)
def test_resolve_checkpoint_of_an_unknown_name(tmp_path, monkeypatch, spec, guess):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-folder").mkdir()
    message = (
        f"checkpoint not found: {spec} (not a file, a run folder or a zoo name; {guess}`sdetr zoo` lists the names)"
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        zoo.resolve_checkpoint(spec)
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        zoo.resolve_checkpoint(spec)


def test_zoo_table(tmp_path, monkeypatch):
    monkeypatch.setenv("SDETR_ZOO_DIR", str(tmp_path))
    (tmp_path / "sparse_detr_swint_30.pth").touch()
    table = zoo.zoo_table()
    assert list(table.columns) == [
        *("name", "preset", "backbone", "init", "rho", "AP", "params_M", "GFLOPs", "FPS_b4", "cached", "file")
    ]
    assert len(table) == 15 and list(table["name"]) == list(zoo.ZOO)
    assert table.loc[table["cached"], "name"].tolist() == ["sparse-detr-swint-rho0.3"]
    row = table.set_index("name").loc["sparse-detr-r50-scrl-rho0.5"]
    assert (row["init"], row["rho"], row["AP"], row["GFLOPs"], row["file"]) == (
        "scrl",
        0.5,
        47.9,
        135.6,
        "sparse_detr_r50_scrl_50.pth",
    )


@pytest.mark.slow
def test_fetch_a_released_r50_checkpoint_from_a_mirror(tmp_path, monkeypatch):
    entry = zoo.ZOO["sparse-detr-r50-rho0.1"]
    model = perturbed(build_model(get_preset(entry.preset, entry.backbone)))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    content = {"model": official_state_dict(model, "r50_sparse_detr_rho_0.1"), "args": official_args(model.config)}
    torch.save({**content, "epoch": 49}, mirror / entry.file_name)
    del content
    monkeypatch.setenv("SDETR_ZOO_URL", mirror.as_uri())
    monkeypatch.setenv("SDETR_ZOO_DIR", str(tmp_path / "cache"))

    path = zoo.fetch_checkpoint(entry.name, progress=False)
    assert path == tmp_path / "cache" / entry.file_name
    loaded = load_model(path).state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
