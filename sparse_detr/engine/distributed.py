"""Process groups started by ``torchrun`` (or a Slurm job's tasks): setup from the environment, the few
collectives used, and how a run's batch is shared among its processes.

Every helper also works in a single process without a process group (rank 0 of 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sparse_detr.config import TrainConfig
from sparse_detr.errors import ConfigError, SparseDetrError
from sparse_detr.utils.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
    NCCL on GPUs, gloo on CPUs. Without those variables, or when already joined, nothing is started."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = resolve_device(device, local_rank)
    if not is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistInfo(get_rank(), get_world_size(), local_rank, target)


def leave_process_group() -> None:
    """End this process's part in the process group and go on as a single process (rank 0 of 1): what
    is left of a job after its distributed training, such as measuring the model, runs on rank 0 alone."""
    if is_initialized():
        dist.destroy_process_group()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def share_batch(config: TrainConfig, processes: int) -> TrainConfig:
    """``config`` for each of ``processes`` processes that together train what it trains in one process: the
    same ``batch_size`` x ``grad_accum`` images per optimizer step, hence the same learning rates, steps and
    data order (:class:`~sparse_detr.engine.sampling.EpochBatchSampler` deals a step's images out among the
    processes). The processes take over accumulated batches first (8 GPUs do in one pass what one GPU does in
    ``grad_accum = 8``), then split each batch; ``iters_per_epoch`` (batches per process) shrinks with the
    accumulation.

    Raises:
        ConfigError: the step's images cannot be shared evenly.
    """
    from_accumulation = math.gcd(config.grad_accum, processes)
    from_batch = processes // from_accumulation
    if config.batch_size % from_batch:
        raise ConfigError(
            f"a step of batch_size {config.batch_size} x grad_accum {config.grad_accum} images cannot be shared by "
            f"{processes} processes: make batch_size x grad_accum a multiple of {processes}, or train on fewer"
        )
    iters = config.iters_per_epoch
    return dataclasses.replace(
        config,
        batch_size=config.batch_size // from_batch,
        grad_accum=config.grad_accum // from_accumulation,
        iters_per_epoch=None if iters is None else max(iters // from_accumulation, 1),
    )


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def main_first(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 first, then on the others (which then find what rank 0 downloaded or built).
    When it fails on rank 0 with the project's own error, every process raises it (none waits forever)."""
    failure = None
    if get_rank() == 0:
        try:
            result = work()
        except SparseDetrError as error:
            failure = error
    failure = broadcast_from_main(failure)  # also the barrier that holds the others back
    if failure is not None:
        raise failure
    return result if get_rank() == 0 else work()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over the processes (one collective for the whole dict)."""
    if not is_initialized() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= get_world_size()
    return dict(zip(keys, tensor.tolist()))


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on at least one (so all of them stop together)."""
    if not is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` as a list, on rank 0; None on the others."""
    if not is_initialized():
        return [obj]
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) across processes and copy rank 0's
    others. DDP only copies rank 0's buffers at the start of each forward, so after an epoch's last step every
    process holds statistics of its own batches; averaging makes them one estimate over all of them."""
    if not is_initialized():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(get_world_size())
        else:
            dist.broadcast(buffer, src=0)
