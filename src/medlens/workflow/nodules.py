"""``medlens nodules extract``: LUNA16/LIDC scans + annotations -> an HDF5 patch store of positives
(with rotation augmentation) and negatives (candidates, or points sampled inside the lung mask).

The extraction and the store are ``data.patches`` (scans read from the volume store, ``data.volume_store``, patch by
patch); this module adds negatives sampled inside the lung mask: ``lung_mask_of``, the lung mask of
``imaging.segment.lung_mask`` voxel for voxel in a fraction of its memory, computed from the stored volume slab by
slab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, cast

import cv2
import numpy as np
from scipy import ndimage

from medlens.data.nodules import Scan
from medlens.data.patches import ExtractReport
from medlens.data.patches import extract_patches as extract_patch_store
from medlens.data.volume_store import StoredVolume, release_freed_memory
from medlens.errors import DataError

__all__ = ["ExtractReport", "extract_patches", "lung_mask_of", "sample_negatives"]


LUNG_THRESHOLD_HU = -320.0  # ``imaging.segment.lung_mask``'s default


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` in 16-bit labels (half of scipy's int32) when they fit, else 32-bit."""
    try:
        return cast(tuple[np.ndarray, int], ndimage.label(mask, output=np.uint16))
    except RuntimeError:  # more than 65,535 components
        return cast(tuple[np.ndarray, int], ndimage.label(mask, output=np.int32))


def _keep(lab: np.ndarray, keep: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """``out = isin(lab, keep)``, slice by slice through a lookup table (np.isin on the volume makes int64 copies)."""
    table = np.zeros(n + 1, bool)
    table[keep] = True
    for k in range(len(lab)):
        np.take(table, lab[k], out=out[k])
    return out


def _largest(mask: np.ndarray, n: int) -> np.ndarray:
    """``imaging.segment.largest_components(mask, n)``: the same components (sizes as float64, the same argsort)."""
    lab, k = _label(mask)
    if k <= n:
        return mask.astype(bool)
    sizes = np.zeros(k + 1, np.int64)
    for z in range(len(lab)):
        sizes += np.bincount(lab[z].ravel(), minlength=k + 1)
    keep = np.argsort(sizes[1:].astype(np.float64))[::-1][:n] + 1
    return _keep(lab, keep, k, np.empty(mask.shape, bool))


def lung_mask_of(scan: Scan, threshold_hu: float = LUNG_THRESHOLD_HU) -> np.ndarray:
    """``imaging.segment.lung_mask(scan)``, voxel for voxel, in about a fifth of its memory (2 bytes a voxel of
    labels where it holds 4, and no int64 copy of the volume; 1.9 GB -> ~0.4 GB for a 512 x 512 x 261 CT): the air
    mask is read slab by slab from a stored volume, components are labelled in 16 bits, and the label look-ups run
    slice by slice. The tests check it against ``lung_mask``."""
    if isinstance(scan, StoredVolume):
        air = scan.below(threshold_hu)
    else:
        air = np.asarray(scan.array < threshold_hu)
    lab, n = _label(air)
    # outside air touches the in-plane edges; the lungs may touch the first/last slice, so z edges don't count
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    outside = np.zeros(n + 1, bool)
    outside[border[border > 0]] = True
    for k in range(len(air)):  # air becomes ``inside``: air not connected to the border
        air[k] &= ~outside[lab[k]]
    del lab
    lungs = _largest(air, 2)
    del air
    biggest = _largest(lungs, 1)
    total = int(lungs.sum())
    if total > 0 and int(biggest.sum()) / total > 0.9:  # one dominant component: lungs touch
        lungs = biggest
    del biggest
    r = max(1, int(round(10.0 / scan.spacing[1])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    out = np.zeros_like(lungs)
    for k in np.flatnonzero(lungs.any((1, 2))):
        sl = np.pad(lungs[k].astype(np.uint8), r)
        closed = cv2.morphologyEx(sl, cv2.MORPH_CLOSE, kernel)[r:-r, r:-r].astype(bool)
        out[k] = ndimage.binary_fill_holes(closed)
    return out


def sample_negatives(image: Scan, positives_world: np.ndarray, n: int, min_distance_mm: float, rng) -> np.ndarray:
    """``n`` random world points inside the lungs, at least ``min_distance_mm`` from every positive."""
    if n <= 0:  # the loop below stops at len == n: n = 0 would take every lung voxel
        return np.zeros((0, 3))
    lungs = lung_mask_of(image)
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
