"""Lung-nodule patches (LUNA16 / LIDC): candidates, world-coordinate patch extraction in 2D and 3D, and
an HDF5 patch store that streams into training (writing the store: ``medlens.workflow.nodules``).

The store (h5py) holds raw HU patches (int16, one chunk per patch) with labels, source series,
world coordinates (mm) and patient id; the lung window is applied when batches are read.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from medlens.data.base import SplitData, read_csv_checked
from medlens.data.catalog import BINARY
from medlens.data.splits import patient_split
from medlens.data.volume_store import StoredVolume, VolumeSpec, prepare_volume
from medlens.errors import DataError, MedlensWarning
from medlens.io.dicom import list_series
from medlens.io.image import Image
from medlens.io.windows import apply_window

AIR_HU = -1024


def read_candidates(path: str | Path) -> pd.DataFrame:
    """LUNA16 ``annotations.csv`` (label 1, with diameter) or ``candidates.csv`` (``class`` 0/1)."""
    path = Path(path)
    need = ["seriesuid", "coordX", "coordY", "coordZ"]
    df = read_csv_checked(path, need, "LUNA16 CSV (seriesuid,coordX,coordY,coordZ[,diameter_mm|class])")
    for c in need[1:]:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise DataError(f"column '{c}' is not numeric", path)
    df = df.copy()
    if "class" in df.columns:
        df["label"] = df["class"].astype(int)
    else:
        df["label"] = 1
    if "diameter_mm" not in df.columns:
        df["diameter_mm"] = np.nan
    df["seriesuid"] = df["seriesuid"].astype(str)
    return df


def find_scans(scans: str | Path | list) -> dict[str, Path]:
    """Map seriesuid -> scan: ``<seriesuid>.mhd`` files, else DICOM series folders (by SeriesInstanceUID).

    ``scans`` is one folder or several (e.g. the LUNA16 ``.mhd`` folder and a DICOM series folder); a
    seriesuid found in an earlier folder is not replaced by a later one.
    """
    out: dict[str, Path] = {}
    for root in ([scans] if isinstance(scans, (str, Path)) else list(scans)):
        root = Path(root)
        if not root.exists():
            raise DataError("scan folder not found", root)
        found: dict[str, Path] = {p.stem: p for p in root.rglob("*.mhd")}
        if not found:
            for s in list_series(root):
                found[s.series_uid] = s.files[0].parent
        if not found:
            raise DataError("no .mhd scans or DICOM series found", root)
        for uid, p in found.items():
            out.setdefault(uid, p)
    return out


DEFAULT_NODULE_RADIUS_MM = 5.0  # a candidate row without a diameter is the same nodule within this distance


def merge_positives(annotated: np.ndarray, diameters: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """One world point per nodule: the annotations, plus the positive candidates that are not already
    one of them.

    LUNA16's ``candidates.csv`` lists ``class == 1`` rows at (or near) the nodules of ``annotations.csv``;
    a candidate inside an annotated nodule (within its radius, ``diameter_mm / 2``, or
    ``DEFAULT_NODULE_RADIUS_MM`` when the diameter is not given) is that nodule again and is dropped,
    as are repeated candidates of one nodule.
    """
    annotated = np.asarray(annotated, float).reshape(-1, 3)
    candidates = np.asarray(candidates, float).reshape(-1, 3)
    radius = np.asarray(diameters, float).reshape(-1) / 2.0
    radius = np.where(np.isfinite(radius) & (radius > 0), radius, DEFAULT_NODULE_RADIUS_MM)
    kept_pts, kept_r = list(annotated), list(radius)
    for c in candidates:
        if kept_pts:
            d = np.linalg.norm(np.asarray(kept_pts) - c, axis=1)
            if (d <= np.asarray(kept_r)).any():
                continue
        kept_pts.append(c)
        kept_r.append(DEFAULT_NODULE_RADIUS_MM)
    return np.asarray(kept_pts, float).reshape(-1, 3)


#: what a scan is stored as for patch extraction: the source's grid and raw HU (the lung window is applied when a
#: batch is read, the 3D extractor resamples per patch), in chunks that patch reads slice
SCAN_SPEC = VolumeSpec()

#: a CT in memory (``io.Image``) or in the volume store (``StoredVolume``: its patches read only their chunks)
Scan = Image | StoredVolume


def load_scan(path: Path) -> StoredVolume:
    """The scan at ``path`` (a ``.mhd`` or a DICOM series folder) from the volume store, prepared into it the first
    time: patches are then read chunk by chunk, never the whole volume."""
    return prepare_volume(path, SCAN_SPEC)


def extract_patch_2d(image: Scan, world_xyz, size: int = 50) -> np.ndarray | None:
    """Axial ``size`` x ``size`` HU patch centred on a world point (nearest slice); None if outside."""
    z, y, x = image.world_to_voxel(world_xyz)
    k, cy, cx = int(round(z)), int(round(y)), int(round(x))
    if not (0 <= k < image.shape[0] and 0 <= cy < image.shape[1] and 0 <= cx < image.shape[2]):
        return None
    h = size // 2
    out = np.full((size, size), AIR_HU, np.int16)
    y0, x0 = cy - h, cx - h
    ys, xs = slice(max(y0, 0), min(y0 + size, image.shape[1])), slice(max(x0, 0), min(x0 + size, image.shape[2]))
    out[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0] = image.array[k, ys, xs]
    return out


def extract_patch_3d(image: Scan, world_xyz, size: int = 32, spacing: float = 1.0) -> np.ndarray | None:
    """``size``^3 HU patch at isotropic ``spacing`` mm centred on a world point (linear interpolation,
    aligned with the scan's axes); None if the centre is outside the scan.

    Only the voxels the patch's grid falls among (its bounding box in the scan, one voxel more each side for the
    interpolation) are read: from a ``StoredVolume`` that is the chunks of that box."""
    z, y, x = image.world_to_voxel(world_xyz)
    shape = np.asarray(image.shape)
    if not all(-0.5 <= v <= n - 0.5 for v, n in zip((z, y, x), shape)):
        return None
    d = np.asarray(image.direction)
    half = (size - 1) / 2.0 * spacing
    origin = np.asarray(world_xyz, float) - d @ np.array([half, half, half])
    corners = origin + np.array(list(itertools.product((0.0, 2 * half), repeat=3))) @ d.T
    vox = image.world_to_voxel(corners)
    lo = np.clip(np.floor(vox.min(0)).astype(int) - 1, 0, shape - 1)
    hi = np.clip(np.ceil(vox.max(0)).astype(int) + 2, lo + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    src = sitk.GetImageFromArray(np.ascontiguousarray(image.array[box]))
    src.SetSpacing([float(s) for s in image.spacing_xyz])
    src.SetOrigin([float(o) for o in image.voxel_to_world(lo)])
    src.SetDirection([float(v) for v in d.ravel()])
    ref = sitk.Image([size] * 3, src.GetPixelID())
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(src.GetDirection())
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, float(AIR_HU))
    return sitk.GetArrayFromImage(out).astype(np.int16)


def _member(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    """The array ``key`` of a patch store (a KeyError when absent)."""
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"not a medlens patch store ('{key}' is a {type(obj).__name__}, not an array)", path)
    return obj


class PatchStoreDataset:
    """An HDF5 patch store (or a subset of it) with the ``ArrayDataset`` batch interface.

    Patches stay on disk: ``batch(idx)`` reads only the requested chunks and applies the lung
    window ([-1350, 150] HU -> [0, 1]). Labels, ids and sources are small and kept in memory.
    """

    def __init__(self, path: str | Path, indices: np.ndarray | None = None, name: str | None = None,
                 window: str = "lung") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError("patch store not found (create it with `medlens nodules extract`)", self.path)
        try:
            self._f = h5py.File(self.path, "r")
            ds = _member(self._f, "patches", self.path)
            labels = _member(self._f, "labels", self.path)[()]
            series = np.asarray(_member(self._f, "seriesuid", self.path).asstr()[()])
            pids = np.asarray(_member(self._f, "patient_id", self.path).asstr()[()])
            worlds = _member(self._f, "world_mm", self.path)[()]
        except (OSError, KeyError) as e:
            raise DataError(f"not a medlens patch store ({e})", self.path) from None
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        self._patches = ds
        self.labels = labels[self.indices].astype(np.int64)
        self.patient_ids = pids[self.indices]
        self.sources = np.array([f"{s}@({w[0]:.1f},{w[1]:.1f},{w[2]:.1f})" for s, w in
                                 zip(series[self.indices], worlds[self.indices])])
        self.world_mm = worlds[self.indices]
        self.task, self.class_names = BINARY, ["non-nodule", "nodule"]
        self.name = name or self.path.stem
        self.window = window
        self.meta = {"store": str(self.path)}

    # the ArrayDataset interface
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def images(self):  # shape information for the engine (no data read)
        class _Shape:
            def __init__(self, shape, dtype):
                self.shape, self.dtype, self.ndim = shape, dtype, len(shape)
        return _Shape((len(self),) + self._patches.shape[1:], np.float32)

    @property
    def spatial_dims(self) -> int:
        return self._patches.ndim - 2

    @property
    def in_channels(self) -> int:
        return int(self._patches.shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._patches.shape[2:])

    @property
    def n_outputs(self) -> int:
        return 1

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=2)

    def subset(self, idx, name: str | None = None) -> "PatchStoreDataset":
        return PatchStoreDataset(self.path, self.indices[np.asarray(idx)], name or self.name, self.window)

    def read_hu(self, idx) -> np.ndarray:
        """Raw HU patches in the order asked. One read per patch (each is one chunk): h5py's fancy
        indexing is about 15x slower than this loop for shuffled batches."""
        rows = self.indices[np.asarray(idx)]
        out = np.empty((len(rows),) + self._patches.shape[1:], self._patches.dtype)
        for j in np.argsort(rows, kind="stable"):  # visit the file in order
            out[j] = self._patches[int(rows[j])]
        return out

    def batch(self, idx):
        x = apply_window(self.read_hu(idx), self.window)
        return torch.from_numpy(x), torch.from_numpy(self.labels[np.asarray(idx)])


def load_patch_store(path: str | Path, val: float = 0.15, test: float = 0.25, seed: int = 0,
                     test_patient: str | None = None) -> SplitData:
    """Split a store by patient.

    - 3 or more patients and no ``test_patient``: the stratified patient-level split.
    - ``test_patient`` given, or exactly 2 patients: leave-one-scan-out. The test split is that patient
      (by default, of two, the one with fewer nodule patches: the other must train); validation is a
      patient-level split of the others when there are at least two, else a patch-level split of the
      one training scan (rotated copies of its nodules can then sit in both train and validation).
    - 1 patient: a patch-level split in which augmented copies of one nodule stay together.
    Every fallback says so in ``split_method`` and warns: its metrics are a pipeline check.
    """
    full = PatchStoreDataset(path)
    pids = full.patient_ids
    patients = sorted(np.unique(pids).tolist())
    if test_patient is not None and test_patient not in patients:
        shown = ", ".join(p[-12:] for p in patients[:5])
        raise DataError(f"data.test_patient {test_patient!r} is not a patient of the store (patients end in "
                        f"{shown})", path)
    if len(patients) >= 3 and test_patient is None:
        tr, va, te = patient_split(full.labels, pids, val, test, seed)
        how = f"patient-level split of the patch store (seed {seed})"
    elif len(patients) >= 2:
        if test_patient is None:
            positives = {p: int(full.labels[pids == p].sum()) for p in patients}
            test_patient = min(patients, key=lambda p: (positives[p], p))
        te = np.flatnonzero(pids == test_patient)
        rest = np.flatnonzero(pids != test_patient)
        val_share = min(0.5, val / max(1.0 - test, 1e-6)) if val > 0 else 0.0
        rest_patients = np.unique(pids[rest])
        if len(rest_patients) >= 2:
            a, b, _ = patient_split(full.labels[rest], pids[rest], val_share, 0.0, seed)
            inner = "validation a patient-level split of the other patients"
        else:
            a, b, _ = patient_split(full.labels[rest], np.arange(len(rest)).astype(str), val_share, 0.0, seed)
            inner = ("validation a patch-level split of the one training scan (rotated copies of a nodule can be "
                     "in both training and validation)")
        tr, va = rest[a], rest[b]
        n_test_pos = int(full.labels[te].sum())
        how = (f"leave-one-scan-out: test = patient {test_patient} ({len(te)} patches, {n_test_pos} nodule "
               f"patches); {inner}. With {len(patients)} patients the metrics are a pipeline check, not a result")
        warnings.warn(how, MedlensWarning)
    else:
        groups = np.array([f"{s}|{w[0]:.2f},{w[1]:.2f},{w[2]:.2f}" for s, w in zip(pids, full.world_mm)])
        tr, va, te = patient_split(full.labels, groups, val, test, seed)
        how = ("patch-level split: the store holds fewer than 3 patients, so train/val/test share patients "
               "(augmented copies of a nodule stay together); metrics are optimistic")
        warnings.warn(how, MedlensWarning)
    return SplitData(full.subset(np.sort(tr), "train"), full.subset(np.sort(va), "val"),
                     full.subset(np.sort(te), "test"), split_method=how)


def nodule_mask_patches(image: Image, mask: np.ndarray, world_xyz, dims: int = 2, size: int = 50,
                        spacing: float = 1.0) -> np.ndarray | None:
    """The patch of a nodule mask (e.g. the LIDC consensus) on exactly the grid of the image patch."""
    m = image.with_array(mask.astype(np.int16) * 1000 + AIR_HU)  # reuse the HU patch extractors
    p = extract_patch_2d(m, world_xyz, size) if dims == 2 else extract_patch_3d(m, world_xyz, size, spacing)
    return None if p is None else p > (AIR_HU + 500)
