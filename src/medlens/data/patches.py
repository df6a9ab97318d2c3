"""Writing a lung-nodule patch store (``medlens nodules extract``): LUNA16/LIDC scans + annotations -> an HDF5
store of positives (with rotated copies) and negatives (``class == 0`` candidates, or points a sampler picks).

The store's reader, the candidate CSVs and the patch extraction in 2D and 3D are ``data.nodules``; the
negative sampler inside the lung mask is ``workflow.nodules.sample_negatives`` (imaging sits above data), passed
in as ``negatives``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from medlens.data.nodules import (
    extract_patch_2d,
    extract_patch_3d,
    Scan,
    find_scans,
    load_scan,
    merge_positives,
    read_candidates,
)
from medlens.errors import ConfigError, DataError, MedlensWarning
from medlens.utils import atomic_path

#: (scan (a ``StoredVolume`` here), positives in world mm, how many, minimum distance in mm, numpy Generator) -> world points (n, 3)
NegativeSampler = Callable[[Scan, np.ndarray, int, float, np.random.Generator], np.ndarray]


def rotated_copies(patch: np.ndarray, dims: int) -> list[np.ndarray]:
    """90/180/270-degree in-plane rotations and a flip (the seed's positive augmentation)."""
    ax = (-2, -1)
    out = [np.rot90(patch, k, axes=ax).copy() for k in (1, 2, 3)]
    out.append(np.flip(patch, -1).copy())
    return out


@dataclass
class ExtractReport:
    scans: int = 0
    positives: int = 0
    negatives: int = 0
    augmented: int = 0
    skipped_outside: int = 0
    skipped_no_scan: int = 0
    seconds: float = 0.0
    path: Path | None = None


def check_extract_args(dims, size, spacing, neg_ratio, seed, min_distance) -> None:
    """Counts, sizes and ratios: refused in one line when negative, zero where that means nothing, or not finite."""
    if dims not in (2, 3):
        raise ConfigError(f"dims (--dims) must be 2 or 3, not {dims}")
    if size is not None and (int(size) != size or size < 1):
        raise ConfigError(f"size (--size) must be a whole number of voxels >= 1, not {size}")
    for name, value, low_ok in (("spacing (--spacing)", spacing, False), ("neg_ratio (--neg-ratio)", neg_ratio, True),
                                ("min_negative_distance_mm", min_distance, True)):
        if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
            raise ConfigError(f"{name} must be a finite number {'>= 0' if low_ok else '> 0'}, not {value}")
    if seed < 0:
        raise ConfigError(f"seed (--seed) must be >= 0, not {seed}")


def extract_patches(scans: str | Path | list[str | Path], annotations: str | Path, out: str | Path, *,
                    candidates: str | Path | None = None,
                    dims: int = 2, size: int | None = None, spacing: float = 1.0, neg_ratio: float = 5.0,
                    augment_positives: bool = True, seed: int = 0, min_negative_distance_mm: float = 20.0,
                    progress: Callable | None = None, negative_scans: bool = False,
                    negatives: NegativeSampler | None = None) -> ExtractReport:
    """Write an HDF5 patch store from LUNA16-style scans and annotations.

    Positives are the annotations (or ``class == 1`` candidates); negatives are ``class == 0``
    candidates, or points sampled inside the lungs away from every positive. Negatives are
    undersampled to ``neg_ratio`` per positive (the seed used about 1 positive in 6); positives are
    augmented by rotations when ``augment_positives``. ``negatives`` samples the negatives of a scan with no
    candidate row (``workflow.nodules.sample_negatives``: points inside the lung mask); without it such a
    scan gives positives only.
    """
    t0 = time.time()
    check_extract_args(dims, size, spacing, neg_ratio, seed, min_negative_distance_mm)
    size = size or (50 if dims == 2 else 32)
    ann = read_candidates(annotations)
    cand = read_candidates(candidates) if candidates else None
    scan_map = find_scans(scans)
    rng = np.random.default_rng(seed)
    rep = ExtractReport()
    missing = sorted(set(ann.seriesuid) - set(scan_map))
    uids = [u for u in dict.fromkeys(ann.seriesuid) if u in scan_map]
    if cand is not None:
        uids += [u for u in dict.fromkeys(cand.seriesuid) if u in scan_map and u not in uids]
    if negative_scans:  # LUNA16 lists every nodule: a scan with no row has none, so it gives negatives only
        uids += [u for u in scan_map if u not in uids]
    if missing:
        rep.skipped_no_scan = int(ann.seriesuid.isin(missing).sum())
        warnings.warn(f"{rep.skipped_no_scan} annotation(s) name a seriesuid with no scan in {scans} "
                      f"(e.g. {missing[0]}); skipped", MedlensWarning)
    if not uids:
        raise DataError(f"no annotation matches a scan in {scans} (annotations name {len(set(ann.seriesuid))} "
                        f"series, none present)", annotations)
    patches, labels, series, worlds, pids, kinds = [], [], [], [], [], []
    extract = extract_patch_2d if dims == 2 else (lambda im, w, s: extract_patch_3d(im, w, s, spacing))
    for si, uid in enumerate(uids):
        if progress:
            progress(si, len(uids), uid)
        image = load_scan(scan_map[uid])
        rows = ann.loc[(ann.seriesuid == uid) & (ann.label == 1)]
        pos = rows[["coordX", "coordY", "coordZ"]].to_numpy()
        if cand is not None:  # a nodule in both CSVs is extracted once
            pos = merge_positives(pos, rows["diameter_mm"].to_numpy(),
                                  cand.loc[(cand.seriesuid == uid) & (cand.label == 1)][["coordX", "coordY",
                                                                                         "coordZ"]].to_numpy())
        n_neg = int(round(neg_ratio * max(len(pos), 1)))
        if cand is not None and (cand.seriesuid == uid).any():
            negs = cand.loc[(cand.seriesuid == uid) & (cand.label == 0)][["coordX", "coordY", "coordZ"]].to_numpy()
            if len(negs) > n_neg:
                negs = negs[rng.choice(len(negs), n_neg, replace=False)]
        elif negatives is not None:
            negs = negatives(image, pos, n_neg, min_negative_distance_mm, rng)
        else:
            negs = np.zeros((0, 3))
        for label, pts in ((1, pos), (0, negs)):
            for w in pts:
                p = extract(image, w, size)
                if p is None:
                    rep.skipped_outside += 1
                    continue
                variants = [(p, "original")]
                if label == 1 and augment_positives:
                    variants += [(a, "augmented") for a in rotated_copies(p, dims)]
                for arr, kind in variants:
                    patches.append(arr)
                    labels.append(label)
                    series.append(uid)
                    worlds.append(w)
                    pids.append(uid)
                    kinds.append(kind)
                if label == 1:
                    rep.positives += 1
                    rep.augmented += len(variants) - 1
                else:
                    rep.negatives += 1
        rep.scans += 1
    if rep.skipped_outside:
        warnings.warn(f"{rep.skipped_outside} coordinate(s) outside their scan were skipped", MedlensWarning)
    if not patches:
        raise DataError("no patch could be extracted (all coordinates outside the scans?)", annotations)
    out = Path(out)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            arr = np.stack(patches)[:, None]
            f.create_dataset("patches", data=arr, chunks=(1,) + arr.shape[1:], compression="lzf")
            f.create_dataset("labels", data=np.array(labels, np.int64))
            f.create_dataset("world_mm", data=np.array(worlds, np.float64))
            str_dt = h5py.string_dtype()
            f.create_dataset("seriesuid", data=np.array(series, object), dtype=str_dt)
            f.create_dataset("patient_id", data=np.array(pids, object), dtype=str_dt)
            f.create_dataset("kind", data=np.array(kinds, object), dtype=str_dt)
            f.attrs.update(dims=dims, size=size, spacing=spacing if dims == 3 else -1, units="HU",
                           window="lung", neg_ratio=neg_ratio, seed=seed, source=str(annotations))
    rep.seconds = time.time() - t0
    rep.path = out
    return rep
