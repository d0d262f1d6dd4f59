"""The training loader's order and augmentation seeds, which make a resumed run see exactly what an
uninterrupted one would: the sampler starts mid-epoch, each sample is seeded by (seed, epoch, index).
Also which samples a run uses (``data.limit``) and how many unreadable ones it skipped."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from dino_sparo.config import ConfigError
from dino_sparo.data.images import skipped_images

logger = logging.getLogger(__name__)


def warn_limit_above_size(limit: Optional[int], size: int, where: str) -> None:
    """``data.limit`` is a cap: above the number of images it keeps them all, and says so in the log
    rather than refusing (the same key caps the evaluation splits built from the same data section,
    which are often smaller than the training set)."""
    if limit is not None and limit > size:
        logger.warning("config key 'data.limit' (%d) is above the %d images of %s: using all %d", limit, size,
                       where, size)


class ResumableSampler(Sampler):
    """Distributed, shuffled, drop-last sampler that can start mid-epoch.

    Yields ``(epoch, index)`` pairs so the dataset wrapper can seed each sample's augmentation;
    the permutation depends only on (seed, epoch), so every rank agrees and a resumed run sees
    the same order as an uninterrupted one.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = dataset_len // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the dataset has {dataset_len} images, fewer than one global batch "
                             f"({batch_size} × {world_size} processes): lower data.batch_size_per_gpu")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:used][self.rank::self.world_size][self.start_batch * self.batch_size:]
        return ((self.epoch, int(i)) for i in mine)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random augmentation under a seed made of (seed, epoch, index),
    restoring the process' RNG states afterwards, so results do not depend on worker scheduling."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.manual_seed(sample_seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class CountSkipped(Dataset):
    """Items ``(item, replaced)``: ``replaced`` is 1 when the dataset served another sample because
    this one's image could not be read (``data.corrupt_images: skip``), counted in the loader worker
    that loaded it; :class:`CollateSkipped` sums them per batch for the epoch's report."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        before = skipped_images(self.dataset)
        item = self.dataset[index]
        return item, skipped_images(self.dataset) - before


class CollateSkipped:
    """``[(item, replaced), ...]`` -> ``(collate_fn(items), replaced samples in the batch)``."""

    def __init__(self, collate_fn: Optional[Callable] = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, batch: list[tuple[Any, int]]) -> tuple[Any, int]:
        return self.collate_fn([item for item, _ in batch]), sum(replaced for _, replaced in batch)
