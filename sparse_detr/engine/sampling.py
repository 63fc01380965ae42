"""Deterministic, resumable data order: which images each process sees, in which batch, with which
augmentation draw.

Every epoch's order follows from ``(seed, epoch)`` alone, and each sample's augmentation from
``(seed, epoch, index)``, so neither depends on the number of data-loader workers nor on where a run
was interrupted: a resumed epoch skips the batches already done and continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from sparse_detr.errors import ConfigError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, augmentation seed)`` for one epoch (set with :meth:`set_epoch`).

    Indices are a permutation seeded by ``seed + epoch``, split across ``world_size`` processes as
    :class:`~torch.utils.data.DistributedSampler` does; incomplete batches are dropped, and an epoch
    has at most ``max_batches`` batches, a multiple of ``multiple_of`` (the gradient accumulation).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        multiple_of: int = 1,
    ):
        self.indices = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.seed = seed
        batches = len(self.indices) // batch_size
        if max_batches is not None:
            batches = min(batches, max_batches)
        self.num_batches = batches // multiple_of * multiple_of
        if self.num_batches == 0:
            raise ConfigError(
                f"the training set ({len(dataset)} images over {world_size} process(es)) does not fill "
                f"{multiple_of} batch(es) of {batch_size}: lower --batch-size or --grad-accum, or add images"
            )
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Serve ``epoch``, starting after its first ``skip`` batches."""
        self.epoch, self.skip = epoch, min(skip, self.num_batches)
        self.indices.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = list(self.indices)
        for b in range(self.skip, self.num_batches):
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]


class BlockBatchSampler(Sampler[list[int]]):
    """Evaluation batches: ``batch_size`` consecutive indices of ``0..size-1`` in order (the last batch may be
    smaller), and with ``world_size`` processes, process ``rank`` takes the ``rank``-th contiguous block of
    those batches (the blocks differ by at most one batch; none is repeated).

    Which images share a batch changes a sparse model's output (the padding, and so the tokens kept), so
    the batches are the ones a single process forms, however many processes share them.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        num_batches = math.ceil(size / batch_size)
        start, stop = (num_batches * r // world_size for r in (rank, rank + 1))
        self.batches = [list(range(b * batch_size, min((b + 1) * batch_size, size))) for b in range(start, stop)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, seed)``: the sample is drawn with torch's generator seeded by
    ``seed``, and the caller's generator state is left as it was (model dropout does not shift)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
