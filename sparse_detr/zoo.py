"""The released Sparse DETR checkpoints by name: the registry, their download into the user cache, and
the resolution of a ``--checkpoint`` value (a file, a run folder or a zoo name), with :func:`load_model`,
which loads the detector any of them names.

The 15 files of the kakaobrain/sparse-detr README are 50-epoch COCO 2017 models (91 class slots) with
top-k queries and box refinement: an R50 (ImageNet backbone), a Swin-T and an R50 whose backbone started
from SCRL self-supervised weights, each at ρ = 0.1 … 0.5. A download is checked to load as the entry's
model before it takes its name in the cache, so the cache holds only whole, verified files. The release
publishes no checksums, so the sha256 of each file is recorded beside it (``<file>.sha256``, in
``sha256sum`` format) once it is checked, and every later use verifies it: a cached file that changed is
refused.
"""

from __future__ import annotations

import difflib
import http.client
import logging
import math
import os
import re
import time
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas
import torch
import torch.hub

from sparse_detr.checkpoint import CHECKPOINT_NAME, checkpoint_file, model_from_checkpoint, read_checkpoint
from sparse_detr.config import DEFAULT_PRESET, KEEP_RATIOS, train_recipe
from sparse_detr.errors import CheckpointError, MissingFileError, OutputError, UnavailableError
from sparse_detr.models import DeformableDETR
from sparse_detr.utils.cache import user_cache_dir, writable_cache_folder
from sparse_detr.utils.io import atomic_write, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

RELEASE_URL = "https://arena.kakaocdn.net/brainrepo/sparse_detr/"
ZOO_DIR_VARIABLE = "SDETR_ZOO_DIR"
RECORD_SUFFIX = ".sha256"  # beside each cached file: its sha256 when it was downloaded and checked
# a download in progress writes every few seconds; temp files untouched for longer were left by a killed one
STALE_DOWNLOAD_SECONDS = 600
ZOO_NOTE = (
    "AP, params, GFLOPs and batch-4 FPS as the kakaobrain/sparse-detr README reports them; the SCRL models "
    "have the R50 architecture, so their params, GFLOPs and FPS are the R50 rows' (the README lists only AP)"
)


class CheckpointUnavailableError(UnavailableError):
    """A zoo checkpoint that is not cached could not be downloaded (offline, HTTP error, …)."""


@dataclass(frozen=True)
class ZooEntry:
    """A released checkpoint: its file, the preset and backbone it is, and the README's numbers
    (COCO AP, millions of parameters, GFLOPs, frames per second at batch size 4)."""

    name: str
    file_name: str
    preset: str
    backbone: str  # "r50" or "swin-t", as ModelConfig.backbone
    backbone_init: str  # what the backbone was trained from before COCO: "imagenet" or "scrl"
    keep_ratio: float
    ap: float
    params_m: float
    gflops: float
    fps: float

    @property
    def url(self) -> str:
        """The file's link under :func:`zoo_url` (read now, so a changed ``SDETR_ZOO_URL`` applies)."""
        return f"{zoo_url().rstrip('/')}/{self.file_name}"


def _release_family(
    tag: str,
    backbone: str,
    backbone_init: str,
    aps: tuple[float, ...],
    params_m: float,
    gflops: tuple[float, ...],
    fps: tuple[float, ...],
) -> dict[str, ZooEntry]:
    """The five entries (ρ = 0.1 … 0.5) of one README row group; ``tag`` names them and their files."""
    entries = {}
    for keep_ratio, ap, gflop, speed in zip(KEEP_RATIOS, aps, gflops, fps, strict=True):
        name = f"sparse-detr-{tag.replace('_', '-')}-rho{keep_ratio}"
        file_name = f"sparse_detr_{tag}_{round(keep_ratio * 100)}.pth"
        preset = f"sparse-rho{keep_ratio}"
        entries[name] = ZooEntry(
            name, file_name, preset, backbone, backbone_init, keep_ratio, ap, params_m, gflop, speed
        )
    return entries


# the README's cost columns per architecture, ρ = 0.1 … 0.5
_R50_COST = {"params_m": 40.9, "gflops": (105.4, 112.9, 120.5, 128.0, 135.6), "fps": (26.5, 24.8, 23.2, 21.8, 20.5)}
_SWINT_COST = {"params_m": 41.4, "gflops": (113.4, 121.0, 128.5, 136.1, 143.7), "fps": (21.2, 20.0, 18.9, 18.0, 17.2)}
ZOO: dict[str, ZooEntry] = {
    **_release_family("r50", "r50", "imagenet", aps=(45.3, 45.6, 46.0, 46.2, 46.3), **_R50_COST),
    **_release_family("swint", "swin-t", "imagenet", aps=(48.2, 48.8, 49.1, 49.2, 49.3), **_SWINT_COST),
    # the README lists only the AP of the SCRL models; their architecture, hence their cost, is R50's
    **_release_family("r50_scrl", "r50", "scrl", aps=(46.9, 47.2, 47.4, 47.7, 47.9), **_R50_COST),
}


def zoo_url() -> str:
    """Where the files are downloaded from: ``$SDETR_ZOO_URL`` (a mirror, or a ``file://`` folder) if
    set, else the authors' release folder."""
    return os.environ.get("SDETR_ZOO_URL") or RELEASE_URL


def zoo_dir() -> Path:
    """The cache of downloaded checkpoints: ``$SDETR_ZOO_DIR`` if set, else ``<user cache>/checkpoints``
    (``$XDG_CACHE_HOME/sparse_detr/checkpoints``, ``~/.cache/sparse_detr/checkpoints``)."""
    folder = os.environ.get(ZOO_DIR_VARIABLE)
    return Path(folder) if folder else user_cache_dir() / "checkpoints"


def fetch_checkpoint(name: str, progress: bool = True) -> Path:
    """The cached file of the zoo checkpoint ``name``, downloaded and checked first if not cached yet, and
    verified against its recorded sha256 (:func:`verified_cache_file`) if it is.

    Args:
        progress: show a download progress bar on stderr (a line on the ``sparse_detr`` logger says when a
            download starts).

    Raises:
        KeyError: ``name`` is no zoo name.
        CheckpointUnavailableError: the download failed; one line naming the link and the alternative.
        CheckpointError: the download is not that released checkpoint (it is deleted), or the cached file
            changed since it was checked.
        OutputError: the cache folder cannot be written; one line naming it and ``$SDETR_ZOO_DIR``.
    """
    entry = ZOO[name]
    path = zoo_dir() / entry.file_name
    if path.is_file():
        return verified_cache_file(entry, path)
    writable_cache_folder(path.parent, ZOO_DIR_VARIABLE)
    _remove_stale_downloads(path)
    url = entry.url
    logger.info(f"downloading {name} from {url} to {path}")

    def download_and_check(tmp: Path) -> None:
        _download(entry, url, tmp, progress)
        _check_release(entry, url, tmp)

    # atomic_write deletes the temp file on any error and renames it into place only once checked
    atomic_write(path, download_and_check)
    _record_sha256(path)
    return path


def record_file(path: Path) -> Path:
    """Where the sha256 of the cached checkpoint ``path`` is recorded."""
    return path.with_name(path.name + RECORD_SUFFIX)


def _record_sha256(path: Path) -> None:
    atomic_write_text(record_file(path), f"{file_sha256(path)}  {path.name}\n")


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded for ``path``; None when there is no readable record."""
    try:
        digest = record_file(path).read_text().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    return digest.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", digest) else None


def verified_cache_file(entry: ZooEntry, path: Path) -> Path:
    """``path``, the cached file of ``entry``, once its sha256 is the one recorded when it was downloaded and
    checked. A file cached without a record (by an older version, or copied in by hand) is checked as a
    download is and then recorded (when the cache can be written; a read-only one is checked every time).

    Raises:
        CheckpointError: the file changed since it was checked, or is not the release: one line saying to
            delete it and download it again.
    """
    again = f"delete {path} and run again to download it anew"
    recorded = _recorded_sha256(path)
    if recorded is None:
        try:
            _check_release(entry, str(path), path, "the file")
        except CheckpointError as error:
            raise CheckpointError(f"{error}; {again}") from None
        try:
            _record_sha256(path)
        except OutputError:  # a read-only cache that someone filled: checked again next time
            pass
        return path
    if file_sha256(path) != recorded:
        raise CheckpointError(
            f"{path}, the cached zoo checkpoint {entry.name}, changed since it was downloaded and checked (its "
            f"sha256 is not the one in {record_file(path).name}): {again}"
        )
    return path


def _download(entry: ZooEntry, url: str, destination: Path, progress: bool) -> None:
    try:
        torch.hub.download_url_to_file(url, str(destination), progress=progress)
    except (OSError, http.client.HTTPException) as error:  # URLError and HTTPError are OSErrors
        raise CheckpointUnavailableError(
            f"cannot download the zoo checkpoint {entry.name} from {url} ({_short_reason(error)}); "
            "download the file yourself and pass its path instead of the name (--checkpoint FILE, --init FILE)"
        ) from None


def _short_reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):  # its reason is the underlying error or a message
        return _short_reason(error.reason) if isinstance(error.reason, Exception) else str(error.reason)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_release(entry: ZooEntry, source: str, path: Path, called: str = "the download") -> None:
    """Raise :class:`CheckpointError` naming ``source`` (the link) unless ``path`` loads as ``entry``'s model;
    the reason calls the file ``called``."""
    refused = f"{source} is not the released checkpoint {entry.name}"
    try:
        config = model_from_checkpoint(read_checkpoint(path), path).config.model
    except (ValueError, RuntimeError) as error:  # not a checkpoint, or one that does not build or fit
        # the temp file's name means nothing to the reader: it is deleted
        raise CheckpointError(f"{refused}: {str(error).replace(str(path), called)}") from None
    if config.backbone != entry.backbone or not math.isclose(config.keep_ratio, entry.keep_ratio):
        raise CheckpointError(
            f"{refused}: it holds a {config.backbone} model with keep ratio {config.keep_ratio}, "
            f"not {entry.backbone} with {entry.keep_ratio}"
        )


def _remove_stale_downloads(path: Path) -> None:
    """Delete the temp files that a killed download of ``path`` left: atomic_write's ``.<name>.*.tmp``
    and torch.hub's ``….partial`` beside it; recent ones may belong to a download in progress."""
    now = time.time()
    for leftover in path.parent.glob(f".{path.name}.*"):
        try:
            if now - leftover.stat().st_mtime > STALE_DOWNLOAD_SECONDS:
                leftover.unlink()
        except FileNotFoundError:  # its download just finished or removed it
            pass


def default_checkpoint() -> Path:
    """Where a bare ``sdetr train`` writes its checkpoint (relative to the working folder)."""
    return Path(train_recipe(DEFAULT_PRESET).output_dir) / CHECKPOINT_NAME


def resolve_checkpoint(spec: str | Path | None, progress: bool = True, last: bool = False) -> Path:
    """The checkpoint file that a ``--checkpoint`` value names: an existing file; a run folder's best
    checkpoint (``checkpoint_best.pth``), or its last (``checkpoint.pth``) when ``last`` or when it has no
    best one; else a zoo name (fetched, see :func:`fetch_checkpoint`); None: what a bare ``sdetr train``
    wrote (:func:`default_checkpoint`'s folder, the same way). A local file wins over a zoo entry of the
    same name.

    Raises:
        MissingFileError: one line, when ``spec`` is none of these (never falls back to random weights).
        CheckpointUnavailableError, CheckpointError: as :func:`fetch_checkpoint`.
    """
    if spec is None:
        default = default_checkpoint()
        if default.is_file():
            return checkpoint_file(default.parent, last=last)
        raise MissingFileError(
            f"no --checkpoint given and no {default} (what `sdetr train` writes) in this folder: "
            "run `sdetr train` first or pass --checkpoint PATH"
        )
    path = Path(spec)
    if path.is_file() or (path / CHECKPOINT_NAME).is_file():
        return checkpoint_file(path, last=last)
    if str(spec) in ZOO:
        return fetch_checkpoint(str(spec), progress=progress)
    close = _close_names(str(spec))
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise MissingFileError(
        f"checkpoint not found: {spec} (not a file, a run folder or a zoo name; {guess}`sdetr zoo` lists the names)"
    )


def load_model(
    checkpoint: str | Path,
    preset: str | None = None,
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    last: bool = False,
) -> DeformableDETR:
    """The detector that ``checkpoint`` names (a file of this project or a released official one, a run
    folder: its best checkpoint unless ``last``, or a zoo name, see :func:`resolve_checkpoint`), in eval mode.

    Args:
        preset: architecture to build (a name of ``PRESETS``) instead of the one the file describes;
            the backbone and the number of classes still come from the file.
        overrides: dotted config overrides applied before building (e.g. ``{"model.keep_ratio": 0.3}``).
        trust_checkpoint: unpickle the file fully. Without it only tensors, containers and the official
            ``argparse.Namespace`` are unpickled, and a file holding anything else is refused.
    """
    path = resolve_checkpoint(checkpoint, last=last)
    return model_from_checkpoint(read_checkpoint(path, trust_checkpoint), path, preset, map_location, overrides)


def _close_names(spec: str) -> list[str]:
    """The zoo names most like a mistyped ``spec`` (difflib): the closest, and a second one as close (``rho0.15``
    is as close to ``rho0.1`` as to ``rho0.5``), in registry order; none when nothing is close."""
    matches = difflib.get_close_matches(spec, ZOO, n=2)
    ratios = [difflib.SequenceMatcher(None, spec, name).ratio() for name in matches]
    return sorted((name for name, ratio in zip(matches, ratios) if ratio == ratios[0]), key=list(ZOO).index)


def zoo_table() -> pandas.DataFrame:
    """One row per zoo entry, for ``sdetr zoo``: its numbers (see :data:`ZOO_NOTE`), whether it is cached
    and its file name."""
    folder = zoo_dir()
    return pandas.DataFrame(
        [
            {
                "name": entry.name,
                "preset": entry.preset,
                "backbone": entry.backbone,
                "init": entry.backbone_init,
                "rho": entry.keep_ratio,
                "AP": entry.ap,
                "params_M": entry.params_m,
                "GFLOPs": entry.gflops,
                "FPS_b4": entry.fps,
                "cached": (folder / entry.file_name).is_file(),
                "file": entry.file_name,
            }
            for entry in ZOO.values()
        ]
    )
