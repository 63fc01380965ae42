"""The device a command runs on, checked against what this machine has."""

from __future__ import annotations

import torch

from sparse_detr.errors import DeviceError


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``, …), by default the process's GPU (``cuda:LOCAL_RANK``)
    when CUDA is available, else the CPU.

    Raises:
        DeviceError: the name is no device, or names a GPU this machine does not have.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device!r} is no device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device cuda:{index}: this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise DeviceError(f"--device {device}: sparse_detr runs on cpu or cuda")
    return device
