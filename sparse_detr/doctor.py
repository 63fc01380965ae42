"""Environment report: library versions, devices, and which op backends run here (and why not)."""

from __future__ import annotations

import platform

import timm
import torch
import torchvision

from sparse_detr.ops import BackendStatus, backend_status
from sparse_detr.ops.loader import BackendUnavailableError
from sparse_detr.ops.onnxruntime_library import library_path


def environment() -> dict[str, str]:
    """Versions and devices that decide what this installation can do."""
    cuda = "not available"
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        cuda = f"{torch.cuda.device_count()} device(s): {', '.join(sorted(names))}"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA devices": cuda,
        "CPU threads": str(torch.get_num_threads()),
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def op_backends() -> list[BackendStatus]:
    """Status of the ``cuda``, ``cpu`` and ``pytorch`` backends, building kernels if needed, and of the
    onnxruntime custom-op library (its path is what plain onnxruntime users register)."""
    return [*backend_status(), onnxruntime_library_status()]


def onnxruntime_library_status() -> BackendStatus:
    """The onnxruntime custom-op library of ``sdetr export --msda custom`` files, built if needed."""
    try:
        path = library_path()
    except BackendUnavailableError as error:
        return BackendStatus("onnxruntime", False, str(error))
    note = "register_custom_ops_library(its library, below) in plain onnxruntime"
    return BackendStatus("onnxruntime", True, build_log=path.parent / "build.log", note=note, library=path)


def backend_detail(status: BackendStatus) -> str:
    """A short line on a backend: why it cannot run, else what happened to its cached library (its files are
    :func:`backend_files`)."""
    if not status.available:
        return status.reason
    if status.build_log is None:
        return "always available"
    return status.note or "compiled once, cached"


def backend_files(status: BackendStatus) -> list[str]:
    """``"<backend> <what>: <path>"`` for a backend's library and build log, each a line of its own so that a
    path is shown whole and copies in one piece."""
    files = {"library": status.library, "build log": status.build_log} if status.available else {}
    return [f"{status.name} {what}: {path}" for what, path in files.items() if path is not None]
