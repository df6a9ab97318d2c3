"""Segmentation datasets: image + mask pairs (2D or 3D) from a folder or a CSV manifest.

Every case is loaded once into memory in the model's input form: ``image`` (C, *spatial) float32 after
the colour mode, CLAHE, CT window and per-image scaling, and ``mask`` (*spatial) uint8 class indices.
Masks are checked against their image: the same grid (shape, and for volumes spacing, origin and
direction) and only values from the label set. Splits are by patient (``data.patient_pattern``, the
manifest's patient column or the DICOM PatientID) with the one splitter of ``medlens.data.splits``, stratified
by whether a mask holds foreground; without any of them each image is its own patient (a per-image split, which
``SegSplit.patients_known`` False and the split method say); training draws random patches, a share of them centred on foreground.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medlens.data.base import Preparer, confined_paths, read_csv_checked, refuse_blank_cells
from medlens.data.splits import patient_split, split_method
from medlens.errors import DataError, MedlensWarning, ShapeError
from medlens.io import load
from medlens.io.formats import IMAGE_SUFFIXES, is_image_file, suffix_of
from medlens.io.image import Image


@dataclass
class SegCase:
    """One image with its mask (and optionally a second observer's mask)."""

    case_id: str
    patient_id: str
    image: np.ndarray                # (C, *spatial) float32, the model's input scale
    mask: np.ndarray                 # (*spatial) uint8 class indices
    geometry: Image                  # mask-shaped uint8 template with the source's spacing, origin, direction
    path: Path
    reference: np.ndarray | None = None
    display: np.ndarray | None = None  # uint8 (*spatial) or (*spatial, 3) for overlays

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.geometry.spacing)


@dataclass
class SegSplit:
    train: list[SegCase]
    val: list[SegCase]
    test: list[SegCase]
    split_method: str
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    # True: patient ids from the data (data.patient_pattern, a manifest patient column, DICOM PatientID); False:
    # each image its own patient (a per-image split), as ``SplitData.patients_known`` says for classification
    patients_known: bool = True

    def get(self, split: str) -> list[SegCase]:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def _strip_ext(name: str) -> str:
    """The file name without its image suffix (``.nii.gz`` whole), by ``medlens.io.formats``."""
    suf = suffix_of(name)
    return name[: -len(suf)] if suf in IMAGE_SUFFIXES else Path(name).stem


def find_pairs(root: str | Path, mask_suffix: str, reference_suffix: str | None = None, image_suffix: str = ""
               ) -> list[tuple[Path, Path, Path | None]]:
    """(image, mask, reference) triples in ``root``: the mask of ``<stem><image_suffix>.<ext>`` is
    ``<stem><mask_suffix>`` (and the reference ``<stem><reference_suffix>``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("segmentation folder not found", root)
    masks = sorted(p for p in root.rglob(f"*{mask_suffix}") if p.is_file())
    if not masks:
        raise DataError(f"no masks matching '*{mask_suffix}'", root)
    out = []
    for m in masks:
        stem = m.name[: -len(mask_suffix)]
        cands = [p for p in m.parent.iterdir() if p.is_file() and p != m
                 and _strip_ext(p.name) == stem + image_suffix and is_image_file(p)]
        if not cands:
            raise DataError(f"mask has no image '{stem}{image_suffix}.*' beside it", m)
        ref = m.with_name(stem + reference_suffix) if reference_suffix else None
        if ref is not None and not ref.exists():
            raise DataError(f"reference mask {ref.name} missing", m)
        out.append((sorted(cands)[0], m, ref))
    return out


def read_manifest(csv_path: str | Path, path_column: str, mask_column: str, patient_column: str,
                  reference_column: str | None = None, image_root: str | Path | None = None,
                  allow_outside_root: bool = False) -> list[tuple[Path, Path, Path | None, str | None]]:
    """(image, mask, reference, patient) rows of a segmentation manifest. Image, mask and reference paths
    are relative to ``image_root`` (default: the CSV's folder) and confined to it unless
    ``allow_outside_root``; empty image, mask or patient cells are refused (an empty reference: none)."""
    df = read_csv_checked(csv_path, [path_column, mask_column], "segmentation manifest")
    refuse_blank_cells(df, [path_column, mask_column, patient_column], csv_path, "segmentation manifest")
    base = Path(image_root) if image_root else Path(csv_path).parent
    images = confined_paths(base, df[path_column].astype(str).tolist(), csv_path, path_column, allow_outside_root)
    masks = confined_paths(base, df[mask_column].astype(str).tolist(), csv_path, mask_column, allow_outside_root)
    refs: list[Path | None] = [None] * len(df)
    if reference_column and reference_column in df.columns:
        col = df[reference_column]
        cells = col.astype(str).str.strip().tolist()
        given = [i for i, empty in enumerate(col.isna().tolist()) if not empty and cells[i]]  # empty: no reference
        found = confined_paths(base, [cells[i] for i in given], csv_path, reference_column, allow_outside_root)
        for i, p in zip(given, found):
            refs[i] = p
    pids = df[patient_column].astype(str).tolist() if patient_column in df.columns else [None] * len(df)
    return list(zip(images, masks, refs, pids))


def patient_of(name: str, pattern: str | None, suffix: str = "") -> str:
    if not pattern:
        stem = _strip_ext(name)
        return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
    m = re.search(pattern, name)
    if not m:
        raise DataError(f"file name does not match data.patient_pattern '{pattern}'", name)
    return m.group(1) if m.groups() else m.group(0)


def mask_to_classes(raw: np.ndarray, label_values: Sequence[int] | None, path: Path | str) -> np.ndarray:
    """Map raw mask values to class indices 0..K-1; values outside the label set are an error."""
    a = np.asarray(raw)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:  # RGB-saved binary masks
        if not (a[..., :3] == a[..., :1]).all():
            raise DataError("mask is a colour image; a mask holds one label per pixel", path)
        a = a[..., 0]
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.isfinite(a).all():
        raise DataError("mask holds NaN or infinite values", path)
    present = np.unique(a)
    if label_values is None:
        nz = [v for v in present.tolist() if v != 0]
        if len(nz) > 1 or (nz and nz[0] not in (1, 255)):
            raise DataError(f"mask values {present.tolist()[:10]} are not binary {{0, 1}} or {{0, 255}}; "
                            f"set segmentation.label_values", path)
        return (a > 0).astype(np.uint8)
    bad = sorted(set(present.tolist()) - set(label_values))
    if bad:
        raise DataError(f"mask values {bad[:10]} are outside the label set {list(label_values)}", path)
    lut = {v: i for i, v in enumerate(label_values)}
    out = np.zeros(a.shape, np.uint8)
    for v, i in lut.items():
        out[a == v] = i
    return out


def check_same_grid(image: Image, mask: Image, path: Path | str) -> None:
    """A mask must share its image's voxel grid (shape; for volumes also spacing, origin, direction)."""
    ishape = image.array.shape[: image.spatial_dims]
    mshape = mask.array.shape[: mask.spatial_dims] if mask.spatial_dims == image.spatial_dims else mask.array.shape
    if tuple(ishape) != tuple(mshape):
        raise ShapeError(f"mask grid {tuple(mshape)} differs from its image's {tuple(ishape)}", path)
    if image.spatial_dims == 3:
        if not np.allclose(image.spacing, mask.spacing, rtol=1e-3, atol=1e-4):
            raise ShapeError(f"mask spacing {tuple(np.round(mask.spacing, 4))} differs from its image's "
                             f"{tuple(np.round(image.spacing, 4))}", path)
        if not np.allclose(image.origin, mask.origin, atol=1e-2 * float(np.min(image.spacing))):
            raise ShapeError(f"mask origin {tuple(np.round(mask.origin, 3))} differs from its image's "
                             f"{tuple(np.round(image.origin, 3))}", path)
        if not np.allclose(np.asarray(image.direction), np.asarray(mask.direction), atol=1e-3):
            raise ShapeError("mask orientation differs from its image's", path)


def load_case(image_path: Path, mask_path: Path | None, cfg, label_values, patient_id: str,
              prepare: Preparer, reference_path: Path | None = None) -> SegCase:
    """Read, check and prepare (``prepare``: the run's preparer) one image/mask pair of a ``DataConfig``."""
    img = load(image_path)
    x = np.ascontiguousarray(prepare(img, str(image_path)), dtype=np.float32)
    display = prepare.display(img)
    if img.spatial_dims == 2 and cfg.pixel_spacing:
        img = img.with_array(img.array, spacing=np.array([cfg.pixel_spacing] * 2))

    def read_mask(p: Path) -> np.ndarray:
        m = load(p)
        check_same_grid(img, m, p)
        return mask_to_classes(m.array, label_values, p)

    mask = read_mask(mask_path) if mask_path is not None else np.zeros(x.shape[1:], np.uint8)
    ref = read_mask(reference_path) if reference_path is not None else None
    geometry = img.with_array(np.zeros(img.shape, np.uint8), is_rgb=False)  # a mask-shaped template
    return SegCase(_strip_ext(image_path.name), patient_id, x, mask, geometry, image_path, ref, display)


def load_segmentation(cfg, seg_cfg, prepare: Preparer, rows: list, seed: int = 0,
                      progress: Callable | None = None) -> SegSplit:
    """Build the train/val/test split of a segmentation ``DataConfig`` from its source's ``rows`` ``(image, mask,
    reference or None, patient id or None)`` (``DataSource.pair_rows``); images are prepared by ``prepare``
    (``medlens.transforms.preprocess.prepared_segmentation`` passes the config's). The split is patient-level when
    every row names its patient; otherwise each image is its own patient (``patients_known`` False, a per-image
    split that the split method says)."""
    path = cfg.resolved_path()
    if not rows:
        raise DataError("segmentation manifest has no rows", path)
    known = all(pid is not None for *_, pid in rows)
    cases = []
    for k, (i, m, r, pid) in enumerate(rows):
        if progress:
            progress(k, len(rows))
        pid = pid if known else patient_of(Path(i).name, None, cfg.image_suffix)  # the image is the unit
        cases.append(load_case(i, m, cfg, seg_cfg.label_values, pid, prepare, r))
    dims = {c.image.ndim - 1 for c in cases}
    chans = {c.image.shape[0] for c in cases}
    if len(dims) > 1 or len(chans) > 1:
        raise ShapeError(f"cases mix dimensions {sorted(dims)} or channel counts {sorted(chans)}", path)
    has_foreground = [int(c.mask.any()) for c in cases]  # stratify: empty masks spread over the splits
    tr, va, te = patient_split(has_foreground, [c.patient_id for c in cases], cfg.val_fraction, cfg.test_fraction,
                               seed)
    n_pat = len({c.patient_id for c in cases})
    pick = lambda idx: [cases[i] for i in idx]  # noqa: E731
    k = int(max(c.mask.max() for c in cases)) + 1
    n_cls = len(seg_cfg.label_values) if seg_cfg.label_values else max(k, 2)
    names = seg_cfg.class_names or (["background", "foreground"] if n_cls == 2 else [f"class_{i}" for i in range(n_cls)])
    how = split_method(seed, cfg.val_fraction, cfg.test_fraction, known)
    return SegSplit(pick(tr), pick(va), pick(te),
                    f"{how}; {n_pat} patients, {len(cases)} cases" if known else f"{how}; {len(cases)} cases",
                    names, patients_known=known)


def pad_to(arr: np.ndarray, size: Sequence[int], what: str = "image", warn: bool = True) -> np.ndarray:
    """Pad the trailing spatial axes of ``arr`` up to ``size`` (edge-centred, zeros) and warn once."""
    spatial = arr.shape[-len(size):]
    need = [max(0, s - a) for a, s in zip(spatial, size)]
    if not any(need):
        return arr
    if warn:
        warnings.warn(f"{what} {tuple(spatial)} is smaller than the patch {tuple(size)}; padded with zeros",
                      MedlensWarning, stacklevel=2)
    pad = [(0, 0)] * (arr.ndim - len(size)) + [(n // 2, n - n // 2) for n in need]
    return np.pad(arr, pad)


class PatchSampler:
    """Random training patches, reproducible from (seed, epoch, index).

    Cases are visited in turn; with probability ``foreground_ratio`` a patch is centred on a random
    foreground voxel of its case, otherwise anywhere. Images smaller than the patch are padded.
    """

    def __init__(self, cases: list[SegCase], patch_size: Sequence[int], n_per_epoch: int,
                 foreground_ratio: float = 0.5, seed: int = 0) -> None:
        self.patch = tuple(int(p) for p in patch_size)
        dims = cases[0].image.ndim - 1
        if len(self.patch) != dims:
            raise ShapeError(f"segmentation.patch_size {list(self.patch)} has {len(self.patch)} sizes; "
                             f"the images are {dims}D")
        self.images, self.masks, self.fg = [], [], []
        for c in cases:
            img = pad_to(c.image, self.patch, f"image {c.path.name}")
            msk = pad_to(c.mask, self.patch, "mask", warn=False)
            self.images.append(img)
            self.masks.append(msk)
            self.fg.append(np.flatnonzero(msk.reshape(-1)))
        self.n, self.ratio, self.seed, self.epoch = n_per_epoch, foreground_ratio, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        k = (int(i) + self.epoch * self.n) % len(self.images)
        img, msk, fg = self.images[k], self.masks[k], self.fg[k]
        shape = msk.shape
        if len(fg) and rng.random() < self.ratio:
            centre = np.array(np.unravel_index(fg[rng.integers(len(fg))], shape))
            start = centre - np.array(self.patch) // 2
        else:
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, self.patch)])
        start = np.clip(start, 0, np.array(shape) - np.array(self.patch))
        sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, self.patch))
        x = np.ascontiguousarray(img[(slice(None),) + sl])
        y = np.ascontiguousarray(msk[sl])
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
