"""Data streaming of the training loop: seeds derived per rank and step, an endless sampler that shards batches
across processes and restarts exactly at any batch, and batches moved to the device."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from stepdistill.seeding import derive_seed

# Domain tags so that step seeds, epoch permutations and item seeds never collide.
STEP_STREAM, _EPOCH_STREAM, _ITEM_STREAM = 0, 1, 2


class ShardedInfiniteBatchSampler(Sampler):
    """Endless per-rank batches of ``(index, item_seed)``, restartable at any batch position.

    Epoch ``e`` is ``randperm(n)`` drawn from a generator seeded with ``(seed, e)``; rank ``r`` takes
    ``perm[r::world_size]`` (cut to ``n // world_size`` so that all ranks have equally long epochs). Batches are
    consecutive chunks of that endless stream, so batch ``k`` of a rank is known without replaying batches
    ``0..k-1``. Each item carries a seed derived from ``(seed, rank, k, j)`` that the dataset wrapper uses for its
    random augmentations, which makes them independent of worker processes and resume points.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int, start: int = 0):
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def _epoch(self, e: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(_EPOCH_STREAM, self.seed, e))
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.n < self.world_size:  # fewer items than ranks: each rank cycles through one item per epoch
            return [perm[self.rank % self.n]]
        return perm[self.rank :: self.world_size][: self.n // self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = len(self._epoch(0))
        pos = self.start * self.batch_size
        epoch, offset = divmod(pos, per_epoch)
        order = self._epoch(epoch)
        k = self.start
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if offset == per_epoch:
                    epoch, offset = epoch + 1, 0
                    order = self._epoch(epoch)
                batch.append(order[offset])
                offset += 1
            yield [(i, derive_seed(_ITEM_STREAM, self.seed, self.rank, k, j)) for j, i in enumerate(batch)]
            k += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return sys.maxsize


class SeededItems(Dataset):
    """Serves ``dataset[i]`` under a fixed per-item seed so random crops/flips replay exactly on resume."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (what the augmentations draw from): torch.manual_seed would also queue a seed
            # for every GPU, and capture a stack trace doing so where CUDA is not initialised, for every item.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
