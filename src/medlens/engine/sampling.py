"""Batch loading from an in-memory dataset, with per-epoch seeded shuffling and class balancing.

A loader yields whole batches sliced from the dataset's array (no per-sample collate). The order
of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches as an
uninterrupted one.

Data-parallel training (``num_replicas`` processes) keeps that contract: every process draws the same
epoch order, cuts it into global batches of ``batch_size x num_replicas`` and takes its own slice of each,
so the processes together see exactly the batches of one process with the effective batch size, and every
process has the same number of steps (the last global batch is split evenly, padded from the epoch's start
when it has fewer samples than processes).
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from medlens.tasks import get_task


class _BatchView(Dataset):
    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx):
        return self.ds.batch(idx)


class EpochBatchSampler(Sampler):
    """Yields index batches. ``mode``: ``sequential``, ``shuffle``, ``balanced`` or ``undersample``."""

    def __init__(self, labels: np.ndarray, task: str, batch_size: int, mode: str = "shuffle", seed: int = 0,
                 undersample_ratio: float = 1.0, num_replicas: int = 1, rank: int | None = None) -> None:
        self.labels = np.asarray(labels)
        # rank None: this process's rank in the process group, read when iterating (the sampler is built
        # before the worker processes exist)
        self.num_replicas, self._rank = int(num_replicas), rank
        self.task, self.batch_size, self.mode, self.seed = task, batch_size, mode, seed
        self.ratio = undersample_ratio
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> np.ndarray:
        n = len(self.labels)
        if self.mode == "sequential":
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "shuffle" or not get_task(self.task).exclusive:  # balancing needs one class per case
            return rng.permutation(n)
        y = self.labels.astype(int)
        counts = np.bincount(y)
        if self.mode == "balanced":  # sample with replacement, every class equally likely
            w = 1.0 / counts[y]
            return rng.choice(n, size=n, replace=True, p=w / w.sum())
        # undersample: keep every sample of the minority class, draw ratio x as many of each other class
        minority = int(np.argmin(np.where(counts > 0, counts, np.iinfo(int).max)))
        keep = [np.flatnonzero(y == minority)]
        for c in np.flatnonzero(counts):
            if c != minority:
                idx = np.flatnonzero(y == c)
                k = min(len(idx), int(round(self.ratio * counts[minority])))
                keep.append(rng.choice(idx, size=k, replace=False))
        return rng.permutation(np.concatenate(keep))

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def __iter__(self):
        idx = self._indices()
        if self.num_replicas == 1:
            for i in range(0, len(idx), self.batch_size):
                yield idx[i : i + self.batch_size]
            return
        g = self.batch_size * self.num_replicas
        for i in range(0, len(idx), g):
            chunk = idx[i : i + g]
            if len(chunk) == g:
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                continue
            if len(chunk) < self.num_replicas:  # too few for one each: pad from the start of the epoch
                chunk = np.concatenate([chunk, idx[: self.num_replicas - len(chunk)]])
            yield np.array_split(chunk, self.num_replicas)[self.rank]

    def __len__(self) -> int:
        n = len(self._indices()) if self.mode == "undersample" else len(self.labels)
        g = self.batch_size * self.num_replicas
        return (n + g - 1) // g


def make_loader(ds, batch_size: int, mode: str = "sequential", seed: int = 0, undersample_ratio: float = 1.0,
                num_replicas: int = 1, rank: int | None = None) -> DataLoader:
    sampler = EpochBatchSampler(ds.labels, ds.task, batch_size, mode, seed, undersample_ratio, num_replicas, rank)
    return DataLoader(_BatchView(ds), sampler=sampler, batch_size=None, num_workers=0)
