"""``medlens nodules extract``: LUNA16/LIDC scans + annotations -> an HDF5 patch store of positives
(with rotation augmentation) and negatives (candidates, or points sampled inside the lung mask).

The extraction and the store are ``data.patches`` (scans read from the volume store, ``data.volume_store``, patch by
patch); this module adds negatives sampled inside the lung mask (``imaging.segment.lung_mask``, computed from the
stored volume slab by slab).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from medlens.data.nodules import Scan
from medlens.data.patches import ExtractReport
from medlens.data.patches import extract_patches as extract_patch_store
from medlens.data.volume_store import release_freed_memory
from medlens.errors import DataError
from medlens.imaging.segment import lung_mask

__all__ = ["ExtractReport", "extract_patches", "sample_negatives"]


def sample_negatives(image: Scan, positives_world: np.ndarray, n: int, min_distance_mm: float, rng) -> np.ndarray:
    """``n`` random world points inside the lungs, at least ``min_distance_mm`` from every positive."""
    if n <= 0:  # the loop below stops at len == n: n = 0 would take every lung voxel
        return np.zeros((0, 3))
    lungs = lung_mask(image)
    idx = np.argwhere(lungs[::2, ::4, ::4]) * np.array([2, 4, 4])
    del lungs
    release_freed_memory()
    if len(idx) == 0:
        raise DataError("no lung voxels found to sample negatives from (is this a chest CT in HU?)")
    pts = []
    for i in rng.permutation(len(idx)):
        w = image.voxel_to_world(idx[i])
        if len(positives_world) == 0 or np.linalg.norm(positives_world - w, axis=1).min() >= min_distance_mm:
            pts.append(w)
            if len(pts) == n:
                break
    return np.array(pts).reshape(-1, 3)


def extract_patches(scans: str | Path | list[str | Path], annotations: str | Path, out: str | Path, *,
                    candidates: str | Path | None = None,
                    dims: int = 2, size: int | None = None, spacing: float = 1.0, neg_ratio: float = 5.0,
                    augment_positives: bool = True, seed: int = 0, min_negative_distance_mm: float = 20.0,
                    progress: Callable | None = None, negative_scans: bool = False) -> ExtractReport:
    """Write an HDF5 patch store from LUNA16-style scans and annotations (``data.patches.extract_patches``),
    negatives sampled inside the lungs away from every positive where no candidate lists them."""
    return extract_patch_store(scans, annotations, out, candidates=candidates, dims=dims, size=size, spacing=spacing,
                               neg_ratio=neg_ratio, augment_positives=augment_positives, seed=seed,
                               min_negative_distance_mm=min_negative_distance_mm, progress=progress,
                               negative_scans=negative_scans, negatives=sample_negatives)
