"""Datasets: MedMNIST, image folders, CSV manifests (and, later, patch stores), with splits."""

from __future__ import annotations

from typing import Callable

from medlens.data.base import ArrayDataset, Preparer, Sample, SplitData
from medlens.data.catalog import MEDMNIST, get_info

__all__ = ["ArrayDataset", "Sample", "SplitData", "MEDMNIST", "get_info", "build_data"]


def build_data(cfg, seed: int = 0, prepare: Preparer | None = None, progress: Callable | None = None) -> SplitData:
    """Build train/val/test datasets from a ``DataConfig`` (``$MEDLENS_DATA`` in its paths expanded here).

    Image files (folder and CSV sources) are prepared by ``prepare`` as they load; callers pass the
    run's preparer (``medlens.transforms.preprocess.prepared_data`` does it from the config)."""
    from medlens.data.folder import load_csv_manifest, load_image_folder
    from medlens.data.medmnist import load_medmnist

    path = cfg.resolved_path()
    if cfg.source == "medmnist":
        data = load_medmnist(cfg.name, cfg.size, check_md5=cfg.check_md5, path=path)
        wanted = 3 if cfg.color == "rgb" else 1
        if data.train.in_channels != wanted:
            data = _recolor(data, cfg.color)
    elif cfg.source in ("folder", "csv") and prepare is None:
        raise TypeError("folder and CSV sources need prepare= (see medlens.transforms.preprocess.prepared_data)")
    elif cfg.source == "folder":
        data = load_image_folder(path, prepare, val=cfg.val_fraction, test=cfg.test_fraction,
                                 seed=seed, progress=progress)
    elif cfg.source == "csv":
        data = load_csv_manifest(path, prepare, image_root=cfg.resolved_image_root(),
                                 path_column=cfg.path_column, label_column=cfg.label_column,
                                 patient_column=cfg.patient_column, suffix=cfg.suffix, val=cfg.val_fraction,
                                 test=cfg.test_fraction, seed=seed, progress=progress,
                                 allow_outside_root=cfg.allow_outside_root)
    else:  # hdf5 patch store written by `medlens nodules extract`
        from medlens.data.nodules import load_patch_store

        data = load_patch_store(path, val=cfg.val_fraction, test=cfg.test_fraction, seed=seed,
                                test_patient=cfg.test_patient)
    if cfg.label_map is not None or cfg.positive_class is not None:
        from medlens.data.labels import apply_label_map

        data = apply_label_map(data, cfg.label_map, cfg.positive_class)
    if cfg.max_samples:
        data = SplitData(*(_cap(d, cfg.max_samples, seed) for d in (data.train, data.val, data.test)),
                         split_method=data.split_method + f" (capped at {cfg.max_samples} per split)")
    if cfg.label_fraction < 1:
        data = SplitData(label_subset(data.train, cfg.label_fraction, seed), data.val, data.test,
                         split_method=data.split_method + f" (training labels: {cfg.label_fraction:g} kept, "
                                                          "stratified)")
    return data


def label_subset(ds: ArrayDataset, fraction: float, seed: int) -> ArrayDataset:
    """A stratified, seeded share of a training split: ``ceil(fraction x n)`` samples of each class (at least
    one), for low-label studies. Multi-label rows are stratified by their first positive label."""
    import numpy as np

    y = np.asarray(ds.labels)
    key = y.argmax(1) if y.ndim == 2 else y.reshape(-1)
    rng = np.random.default_rng(seed + 17)
    keep = []
    for c in np.unique(key):
        idx = np.flatnonzero(key == c)
        keep.append(rng.choice(idx, max(1, int(np.ceil(fraction * len(idx)))), replace=False))
    return ds.subset(np.sort(np.concatenate(keep)))


def _cap(ds: ArrayDataset, n: int, seed: int) -> ArrayDataset:
    import numpy as np

    if len(ds) <= n:
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(idx)


def _recolor(data: SplitData, color: str) -> SplitData:
    """Apply the colour mode to MedMNIST RGB data (e.g. green channel for fundus)."""
    import numpy as np

    def conv(ds: ArrayDataset) -> ArrayDataset:
        x = ds.images
        if x.shape[1] == 3 and color == "green":
            x = x[:, 1:2]
        elif x.shape[1] == 3 and color == "gray":
            x = np.round(np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x.astype(np.float32),
                                      axes=(0, 1))[:, None]).astype(np.uint8)
        elif x.shape[1] == 1 and color == "rgb":
            x = np.repeat(x, 3, axis=1)
        out = ds.subset(np.arange(len(ds)))
        out.images = np.ascontiguousarray(x)
        return out

    return SplitData(conv(data.train), conv(data.val), conv(data.test), data.split_method)
