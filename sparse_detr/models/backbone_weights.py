"""Where a backbone's starting weights come from, resolved to a local file before a run does any work.

``ModelConfig.pretrained_backbone`` names a source: ``"imagenet"`` (the reference's weights), ``"timm"``
(timm's default weights for the backbone), a local weights file, or ``"none"`` (random initialization).
:func:`resolve_backbone_weights` turns it into a :class:`BackboneWeights` (a local file and its sha256, what a
run records), fetching the file once into torchvision's or timm's own cache; a file that is neither cached
nor downloadable raises :class:`WeightsUnavailableError` naming the file to pass instead. Nothing falls back
to random weights. :func:`check_backbone_trainable` refuses settings under which a random backbone cannot
learn. Then ``build_model(config, resolve_backbone_weights(config.model))`` starts from those weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, is_offline_mode
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import silent_tqdm

from sparse_detr.config import ModelConfig
from sparse_detr.errors import ConfigError, UnavailableError
from sparse_detr.models.backbone import SWIN_T, timm_model_name
from sparse_detr.utils.io import file_sha256

IMAGENET, TIMM, NONE = "imagenet", "timm", "none"
# torchvision ResNets whose timm model has the same name and layout; their IMAGENET1K_V1 is what the
# reference's torchvision ``pretrained=True`` loaded
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# the official Swin-T ImageNet-1k weights, as timm serves them
SWIN_T_IMAGENET = "swin_tiny_patch4_window7_224.ms_in1k"
HF_WEIGHTS_FILE = "model.safetensors"
PASS_FILE = "--pretrained-backbone"


@dataclass(frozen=True)
class BackboneWeights:
    """The weights a backbone starts from: the configured ``source`` (``"imagenet"``, ``"timm"`` or the
    path given), the local ``file`` holding them and its ``sha256``."""

    source: str
    file: Path
    sha256: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready record for a run folder or checkpoint."""
        return {"source": self.source, "file": str(self.file), "sha256": self.sha256}


class WeightsUnavailableError(UnavailableError):
    """The configured backbone weights are neither on disk nor downloadable; the message (one line) names
    the file needed and how to pass it."""


def resolve_backbone_weights(model_config: ModelConfig, progress: bool = True) -> BackboneWeights | None:
    """The local weights file ``model_config.pretrained_backbone`` names, downloaded into its library's
    cache if needed (``progress``: show a download bar), with its sha256; None for ``"none"``.

    Raises:
        WeightsUnavailableError: the file is missing and cannot be downloaded.
        ValueError: unknown backbone name.
    """
    source, backbone = model_config.pretrained_backbone, model_config.backbone
    if source == NONE:
        return None
    name = timm_model_name(backbone)  # refuses an unknown backbone before any download
    if source == IMAGENET:
        file = _imagenet_file(backbone, name, progress)
    elif source == TIMM:
        file = _timm_file(name, f"timm weights for {backbone}", progress)
    else:
        file = _local_file(source)
    return BackboneWeights(source, file, file_sha256(file))


def check_backbone_trainable(model_config: ModelConfig) -> None:
    """Refuse a random backbone (``pretrained_backbone="none"``) with frozen parts: frozen BatchNorm
    statistics or frozen stages of a random init never learn, and as timm zero-initializes the last BN of
    each residual block, frozen BN keeps every residual branch switched off.

    Raises:
        ValueError: one line saying why and which settings train the backbone instead.
    """
    if model_config.pretrained_backbone != NONE:
        return
    frozen, fixes = [], []
    if model_config.backbone != SWIN_T and model_config.backbone_norm == "frozen_bn":
        frozen.append("backbone_norm=frozen_bn")
        fixes.append("--set model.backbone_norm=batch_norm")
    if model_config.backbone_frozen_stages > 0:
        frozen.append(f"backbone_frozen_stages={model_config.backbone_frozen_stages}")
        fixes.append("--set model.backbone_frozen_stages=0")
    if frozen:
        raise ConfigError(
            f"pretrained_backbone=none with {' and '.join(frozen)} cannot learn: frozen statistics and weights "
            "of a random init never change (and as timm zero-inits each block's last BN, frozen BN keeps every "
            f"residual branch off); train them with {' '.join(fixes)}, or pass {PASS_FILE} imagenet|FILE"
        )


def _imagenet_file(backbone: str, name: str, progress: bool) -> Path:
    """The reference's ImageNet weights for ``backbone`` (timm model ``name``): torchvision's IMAGENET1K_V1
    for its ResNets, the official Swin-T (from timm), timm's default weights for other timm ResNets."""
    what = f"ImageNet weights for {backbone}"
    if name in TORCHVISION_RESNETS:
        return _torchvision_file(torchvision.models.get_model_weights(name).IMAGENET1K_V1.url, what, progress)
    return _timm_file(SWIN_T_IMAGENET if backbone == SWIN_T else name, what, progress)


def _torchvision_file(url: str, what: str, progress: bool) -> Path:
    """``url``'s file in torchvision's cache (``<torch hub dir>/checkpoints``), downloaded there if absent
    and checked against the hash prefix in its name, as ``torch.hub`` does with ``check_hash``."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if file.is_file():
        return file
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = torch.hub.HASH_REGEX.search(file.name).group(1)
        torch.hub.download_url_to_file(url, str(file), hash_prefix=hash_prefix, progress=progress)
    except (OSError, RuntimeError) as error:  # no network (URLError is an OSError), disk, hash mismatch
        raise WeightsUnavailableError(
            f"{what} are not in the torchvision cache ({file}) and cannot be downloaded ({_reason(error)}): "
            f"download {url} and pass {PASS_FILE} /path/to/{file.name}"
        ) from error
    return file


def _timm_file(name: str, what: str, progress: bool) -> Path:
    """The weights of timm model ``name`` (``arch`` or ``arch.tag``) from timm's Hugging Face repository:
    from the local Hub cache when there (offline, instantly), else downloaded unless ``HF_HUB_OFFLINE``."""
    config = timm.models.get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        raise WeightsUnavailableError(f"timm has no Hugging Face weights for {name}: pass {PASS_FILE} FILE")
    repo_id = config.hf_hub_id
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=HF_WEIGHTS_FILE, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    unavailable = (
        f"{what} ({repo_id}/{HF_WEIGHTS_FILE}) are not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE})"
    )
    url = f"https://huggingface.co/{repo_id}/resolve/main/{HF_WEIGHTS_FILE}"
    how = f"download {url} and pass {PASS_FILE} /path/to/{HF_WEIGHTS_FILE}"
    if _hf_offline():
        raise WeightsUnavailableError(f"{unavailable} and HF_HUB_OFFLINE is set: {how}")
    try:
        file = hf_hub_download(repo_id=repo_id, filename=HF_WEIGHTS_FILE, tqdm_class=None if progress else silent_tqdm)
    except Exception as error:  # network, authentication, Hub and disk failures come as many types
        raise WeightsUnavailableError(f"{unavailable} and cannot be downloaded ({_reason(error)}): {how}") from error
    return Path(file)


def _local_file(source: str) -> Path:
    """``source`` as an existing file's absolute path."""
    file = Path(source).expanduser().resolve()
    if not file.is_file():
        raise WeightsUnavailableError(
            f"no backbone weights file at {file}: pass {PASS_FILE} with an existing FILE, imagenet, timm or none"
        )
    return file


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE``, read again from the environment: huggingface_hub reads it once, at import."""
    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _reason(error: BaseException, limit: int = 160) -> str:
    """``error``'s first line, shortened, for a one-line message."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"
