"""Datasets: the registered data sources (``medlens.data.sources``: MedMNIST, image folders, CSV manifests,
patch stores), with splits."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from medlens.data.base import ArrayDataset, Dataset, Preparer, Sample, SplitData
from medlens.data.catalog import MEDMNIST, get_info
from medlens.data.labels import apply_label_map
from medlens.data.sources import get_source  # the package registers every built-in source
from medlens.data.store import deferred, realize

__all__ = ["ArrayDataset", "Dataset", "Sample", "SplitData", "MEDMNIST", "get_info", "build_data"]


def build_data(cfg, seed: int = 0, prepare: Preparer | None = None, progress: Callable | None = None) -> SplitData:
    """Build train/val/test datasets from a ``DataConfig`` (``$MEDLENS_DATA`` in its paths expanded here).

    Image files (folder and CSV sources) are prepared by ``prepare``; callers pass the run's preparer
    (``medlens.transforms.preprocess.prepared_data`` does it from the config). Through the prepared store
    (``medlens.data.store``) the splits, ``label_map``, ``max_samples`` and ``label_fraction`` select first; only the
    files selected are then prepared (once: later calls read the store), ``progress`` following them."""
    source = get_source(cfg.source)
    if source.reads_files and prepare is None:
        raise TypeError(f"the '{source.name}' source reads image files: it needs prepare= "
                        "(see medlens.transforms.preprocess.prepared_data)")
    with deferred():
        data = source.load(cfg, seed=seed, prepare=prepare, progress=progress)
    if cfg.label_map is not None or cfg.positive_class is not None:
        data = apply_label_map(data, cfg.label_map, cfg.positive_class)
    if cfg.max_samples:
        train, val, test = (_cap(d, cfg.max_samples, seed) for d in (data.train, data.val, data.test))
        data = replace(data, train=train, val=val, test=test,
                       split_method=data.split_method + f" (capped at {cfg.max_samples} per split)")
    if cfg.label_fraction < 1:
        data = replace(data, train=label_subset(data.train, cfg.label_fraction, seed),
                       split_method=data.split_method + f" (training labels: {cfg.label_fraction:g} kept, "
                                                          "stratified)")
    realize([data.train, data.val, data.test], progress)
    return data


def label_subset(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """A stratified, seeded share of a training split: ``ceil(fraction x n)`` samples of each class (at least
    one), for low-label studies. Multi-label rows are stratified by their first positive label."""
    y = np.asarray(ds.labels)
    key = y.argmax(1) if y.ndim == 2 else y.reshape(-1)
    rng = np.random.default_rng(seed + 17)
    keep = []
    for c in np.unique(key):
        idx = np.flatnonzero(key == c)
        keep.append(rng.choice(idx, max(1, int(np.ceil(fraction * len(idx)))), replace=False))
    return ds.subset(np.sort(np.concatenate(keep)))


def _cap(ds: Dataset, n: int, seed: int) -> Dataset:
    if len(ds) <= n:
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(idx)

