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
    note = f"register_custom_ops_library('{path}')"
    return BackendStatus("onnxruntime", True, build_log=path.parent / "build.log", note=note)


def backend_detail(status: BackendStatus) -> str:
    """One line on a backend: why it cannot run, else what happened to its cached library and its build log."""
    if not status.available:
        return status.reason
    if status.build_log is None:
        return "always available"
    return "; ".join(filter(None, (status.note, f"build log: {status.build_log}")))
