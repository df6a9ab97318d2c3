"""Batch loading from an in-memory dataset, with per-epoch seeded shuffling and class balancing.

A loader yields whole batches sliced from the dataset's array (no per-sample collate). The order
of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from medlens.data.catalog import MULTILABEL


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
                 undersample_ratio: float = 1.0) -> None:
        self.labels = np.asarray(labels)
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
        if self.mode == "shuffle" or self.task == MULTILABEL:
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

    def __iter__(self):
        idx = self._indices()
        for i in range(0, len(idx), self.batch_size):
            yield idx[i : i + self.batch_size]

    def __len__(self) -> int:
        n = len(self._indices()) if self.mode == "undersample" else len(self.labels)
        return (n + self.batch_size - 1) // self.batch_size


def make_loader(ds, batch_size: int, mode: str = "sequential", seed: int = 0, undersample_ratio: float = 1.0) -> DataLoader:
    sampler = EpochBatchSampler(ds.labels, ds.task, batch_size, mode, seed, undersample_ratio)
    return DataLoader(_BatchView(ds), sampler=sampler, batch_size=None, num_workers=0)
