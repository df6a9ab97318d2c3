"""Segmentation datasets: image + mask pairs (2D or 3D) from a folder or a CSV manifest.

Every case is read once in the model's input form: ``image`` (C, *spatial) float32 after the colour mode, CLAHE, CT
window and per-image scaling, and ``mask`` (*spatial) uint8 class indices. 2D pictures stay in memory. Grey volumes go
into the volume store (``data.volume_store``, issue 27 item 3) when the preparer names its preparation
(``volume_key``): the prepared image, the mask, the display picture, a second observer's mask and the flat indices of
the mask's foreground voxels, each a chunked Blosc2 array under ``<root>/volumes/<preparation hash>/<case key>.*``,
keyed by the image, mask and reference files (path, size, mtime) and the label values; a case is prepared once, and
``PatchSampler`` reads only the chunks of each patch (``StoredVolume.read_chunks``), while ``SegCase.image`` and
``mask`` read a whole stored case when asked (validation, evaluation: one case at a time).
Masks are checked against their image: the same grid (shape, and for volumes spacing, origin and
direction) and only values from the label set. Splits are by patient (``data.patient_pattern``, the
manifest's patient column or the DICOM PatientID) with the one splitter of ``medlens.data.splits``, stratified
by whether a mask holds foreground; without any of them each image is its own patient (a per-image split, which
``SegSplit.patients_known`` False and the split method say); training draws random patches, a share of them centred on foreground.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, cast

import numpy as np
import torch

from medlens.data.base import Preparer, confined_paths, read_csv_checked, refuse_blank_cells
from medlens.data.splits import patient_split, split_method
from medlens.data.volume_store import (
    FORMAT,
    StoredVector,
    StoredVolume,
    VolumeSpec,
    key_folder,
    prepare_array,
    release_freed_memory,
    volume_source_key,
    write_array,
    write_volume,
)
from medlens.errors import DataError, MedlensWarning, ShapeError
from medlens.io import load
from medlens.io.formats import IMAGE_SUFFIXES, is_image_file, suffix_of
from medlens.io.image import Image


@dataclass
class StoredCase:
    """A volume case in the volume store: the prepared image (z, y, x) float32 (one channel), the mask (z, y, x)
    uint8 class indices on the same grid and chunks, the display picture and a second observer's mask when there is
    one, and ``foreground``: the flat indices (C order) of the mask's non-zero voxels, ``n_foreground`` of them (a
    memory-mapped 1D array, None when there are none)."""

    image: StoredVolume
    mask: StoredVolume
    display: StoredVolume | None
    reference: StoredVolume | None
    foreground: StoredVector | None
    n_foreground: int
    max_label: int


class SegCase:
    """One image with its mask (and optionally a second observer's mask), in memory or in the volume store
    (``stored``): then ``image``, ``mask``, ``reference`` and ``display`` read the whole case from the store each time
    they are asked for, and ``dims``, ``channels``, ``grid``, ``has_foreground`` and ``max_label`` read nothing."""

    def __init__(self, case_id: str, patient_id: str, image: np.ndarray | None, mask: np.ndarray | None,
                 geometry: Image, path: Path, reference: np.ndarray | None = None, display: np.ndarray | None = None,
                 stored: StoredCase | None = None) -> None:
        if stored is None and (image is None or mask is None):
            raise ValueError("a case in memory needs its image and mask")
        self.case_id, self.patient_id, self.path = case_id, patient_id, path
        self.geometry = geometry  # mask-shaped uint8 template with the source's spacing, origin, direction
        self.stored = stored
        self._image, self._mask, self._reference, self._display = image, mask, reference, display

    @property
    def image(self) -> np.ndarray:
        """(C, *spatial) float32, the model's input scale."""
        if self.stored is not None:
            return self.stored.image.read()[None]
        return cast(np.ndarray, self._image)

    @property
    def mask(self) -> np.ndarray:
        """(*spatial) uint8 class indices."""
        if self.stored is not None:
            return self.stored.mask.read()
        return cast(np.ndarray, self._mask)

    @property
    def reference(self) -> np.ndarray | None:
        if self.stored is not None:
            return self.stored.reference.read() if self.stored.reference is not None else None
        return self._reference

    @property
    def display(self) -> np.ndarray | None:
        """uint8 (*spatial) or (*spatial, 3) for overlays."""
        if self.stored is not None:
            return self.stored.display.read() if self.stored.display is not None else None
        return self._display

    @property
    def dims(self) -> int:
        return 3 if self.stored is not None else int(cast(np.ndarray, self._image).ndim - 1)

    @property
    def channels(self) -> int:
        return 1 if self.stored is not None else int(cast(np.ndarray, self._image).shape[0])

    @property
    def grid(self) -> tuple[int, ...]:
        """The spatial shape."""
        return self.stored.mask.shape if self.stored is not None else tuple(cast(np.ndarray, self._mask).shape)

    @property
    def has_foreground(self) -> bool:
        return self.stored.n_foreground > 0 if self.stored is not None else bool(cast(np.ndarray, self._mask).any())

    @property
    def max_label(self) -> int:
        return self.stored.max_label if self.stored is not None else int(cast(np.ndarray, self._mask).max())

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
              prepare: Preparer, reference_path: Path | None = None, store: Path | None = None) -> SegCase:
    """Read, check and prepare (``prepare``: the run's preparer) one image/mask pair of a ``DataConfig``. With
    ``store`` (a folder of the volume store, ``case_folder``) a grey volume is opened from it, or prepared into it
    first, and the case reads from there; anything else is held in memory."""
    key = case_key(image_path, mask_path, reference_path, label_values) if store is not None else ""
    if store is not None:
        stored = open_case(store, key)
        if stored is not None:
            return SegCase(_strip_ext(image_path.name), patient_id, None, None, stored.mask.geometry(), image_path,
                           stored=stored)
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
    if store is not None and img.spatial_dims == 3 and not img.is_rgb and x.shape[0] == 1:
        stored = write_case(store, key, img, x, mask, ref, display)
        del img, x, mask, ref, display
        release_freed_memory()
        return SegCase(_strip_ext(image_path.name), patient_id, None, None, stored.mask.geometry(), image_path,
                       stored=stored)
    geometry = img.with_array(np.zeros(img.shape, np.uint8), is_rgb=False)  # a mask-shaped template
    return SegCase(_strip_ext(image_path.name), patient_id, x, mask, geometry, image_path, ref, display)


def case_folder(prep_key: str, root: str | Path | None = None) -> Path:
    """The volume-store folder of segmentation cases prepared by ``prep_key`` (the preparer's ``volume_key``)."""
    key = json.dumps({"segmentation": prep_key, "format": FORMAT, "chunks": VolumeSpec().chunks,
                      "blocks": VolumeSpec().blocks}, sort_keys=True)
    return key_folder(key, root)


def case_key(image: Path, mask: Path | None, reference: Path | None, label_values) -> str:
    """A case's identity in the store: every file of its image, mask and reference (path, size, mtime) and the
    label values that map the mask to class indices."""
    parts = [volume_source_key(p) if p is not None else None for p in (image, mask, reference)]
    text = json.dumps({"files": parts, "labels": list(label_values) if label_values is not None else None})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_PARTS = ("image", "display", "reference", "foreground", "mask")  # written in this order: the mask last


def _part(folder: Path, key: str, part: str) -> Path:
    return folder / f"{key}.{part}.b2nd"


def write_case(folder: Path, key: str, img: Image, x: np.ndarray, mask: np.ndarray, ref: np.ndarray | None,
               display: np.ndarray | None) -> StoredCase:
    """Store a prepared volume case (``x``: (1, z, y, x) float32 on ``img``'s grid) and open it. Each array is written
    atomically (``write_volume``); the mask, with the case's record, is written last, so a case whose mask opens
    is complete and one killed half-way is prepared again."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_txt = folder / "spec.txt"
    if not spec_txt.exists():
        spec_txt.write_text(f"segmentation cases, {FORMAT=}\n", encoding="utf-8")

    def put(part: str, arr: np.ndarray, extra: dict | None = None) -> None:
        a, rec = prepare_array(img.with_array(arr, is_rgb=False), VolumeSpec())
        if extra is not None:
            rec["extra"] = extra
        write_volume(_part(folder, key, part), a, rec)

    put("image", np.ascontiguousarray(x[0], np.float32))
    if display is not None and display.shape == mask.shape:
        put("display", display.astype(np.uint8, copy=False))
    if ref is not None:
        put("reference", ref)
    fg = np.flatnonzero(mask.reshape(-1)).astype(np.int64)
    if fg.size:
        write_array(_part(folder, key, "foreground"), fg, {"format": FORMAT, "n": int(fg.size)},
                    (min(int(fg.size), 1 << 16),))
    put("mask", mask, {"case": FORMAT, "n_foreground": int(fg.size), "max_label": int(mask.max(initial=0)),
                       "display": display is not None and display.shape == mask.shape,
                       "reference": ref is not None})
    stored = open_case(folder, key)
    if stored is None:
        raise DataError("the stored case does not open after writing it", _part(folder, key, "mask"))
    return stored


def open_case(folder: Path, key: str) -> StoredCase | None:
    """The stored case ``key`` of ``folder``; None when it is not there or not complete (then it is prepared again)."""
    if not _part(folder, key, "mask").exists():
        return None
    try:
        mask = StoredVolume(_part(folder, key, "mask"))
        rec = mask.extra
        n, top = rec.get("n_foreground"), rec.get("max_label")
        if rec.get("case") != FORMAT or not isinstance(n, int) or not 0 <= n <= int(np.prod(mask.shape)) \
                or not isinstance(top, int) or not 0 <= top <= 255 or mask.dtype != np.uint8:
            return None
        image = StoredVolume(_part(folder, key, "image"))
        display = StoredVolume(_part(folder, key, "display")) if rec.get("display") is True else None
        ref = StoredVolume(_part(folder, key, "reference")) if rec.get("reference") is True else None
        if any(v.shape != mask.shape for v in (image, display, ref) if v is not None) or image.dtype != np.float32:
            return None
        fg = StoredVector(_part(folder, key, "foreground"), n, "int64") if n else None
    except DataError:
        return None
    return StoredCase(image, mask, display, ref, fg, n, top)


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
    prep_key = getattr(prepare, "volume_key", None)
    store = case_folder(prep_key, getattr(cfg, "store", None)) if isinstance(prep_key, str) else None
    cases = []
    for k, (i, m, r, pid) in enumerate(rows):
        if progress:
            progress(k, len(rows))
        pid = pid if known else patient_of(Path(i).name, None, cfg.image_suffix)  # the image is the unit
        cases.append(load_case(i, m, cfg, seg_cfg.label_values, pid, prepare, r, store))
    dims = {c.dims for c in cases}
    chans = {c.channels for c in cases}
    if len(dims) > 1 or len(chans) > 1:
        raise ShapeError(f"cases mix dimensions {sorted(dims)} or channel counts {sorted(chans)}", path)
    has_foreground = [int(c.has_foreground) for c in cases]  # stratify: empty masks spread over the splits
    tr, va, te = patient_split(has_foreground, [c.patient_id for c in cases], cfg.val_fraction, cfg.test_fraction,
                               seed)
    n_pat = len({c.patient_id for c in cases})
    pick = lambda idx: [cases[i] for i in idx]  # noqa: E731
    k = max(c.max_label for c in cases) + 1
    n_cls = len(seg_cfg.label_values) if seg_cfg.label_values else max(k, 2)
    names = seg_cfg.class_names or (["background", "foreground"] if n_cls == 2 else [f"class_{i}" for i in range(n_cls)])
    how = split_method(seed, cfg.val_fraction, cfg.test_fraction, known)
    return SegSplit(pick(tr), pick(va), pick(te),
                    f"{how}; {n_pat} patients, {len(cases)} cases" if known else f"{how}; {len(cases)} cases",
                    names, patients_known=known)


def channel_stats(cases: list[SegCase]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every voxel of ``cases`` (``data.normalize: dataset``), exactly
    numpy's float32 ``mean(1)`` and ``std(1)`` of the cases' images concatenated (what training always used), without
    the concatenation when a case is stored: numpy's pairwise summation is followed over the cases end to end
    (``_ConcatSum``), holding one case's image at a time (two where a summation block straddles two cases)."""
    c = cases[0].channels
    if all(k.stored is None for k in cases):
        flat = np.concatenate([k.image.reshape(c, -1) for k in cases], axis=1)
        return flat.mean(1).tolist(), flat.std(1).tolist()
    lengths = [int(np.prod(k.grid)) for k in cases]
    n = np.intp(sum(lengths))
    means, stds = [], []
    for ch in range(c):
        read = lambda i, ch=ch: cases[i].image[ch].reshape(-1)  # noqa: E731
        total = np.array([[_ConcatSum(lengths, read).total()]], np.float32)
        mean = np.true_divide(total, n, out=total, casting="unsafe")  # numpy's _var: the mean kept as (1, 1)
        square = lambda i, read=read, mean=mean: np.square(np.subtract(read(i)[None], mean))[0]  # noqa: E731
        var = np.array([_ConcatSum(lengths, square).total()], np.float32)
        var = np.true_divide(var, np.maximum(n, 0), out=var, casting="unsafe")
        means.append(float(mean[0, 0]))
        stds.append(float(np.sqrt(var, out=var)[0]))
    return means, stds


_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE: pairwise summation sums blocks up to this long with 8 accumulators


def _pairwise_block(a: np.ndarray) -> np.float32:
    """numpy's float32 pairwise sum of one block (at most ``_PW_BLOCK`` values), step by step."""
    f = np.float32
    if len(a) < 8:
        res = f(0)
        for v in a:
            res = f(res + v)
        return res
    r = a[:8].copy()
    m = len(a) - len(a) % 8
    for i in range(8, m, 8):
        r += a[i:i + 8]
    res = f(f(f(r[0] + r[1]) + f(r[2] + r[3])) + f(f(r[4] + r[5]) + f(r[6] + r[7])))
    for v in a[m:]:
        res = f(res + v)
    return res


class _ConcatSum:
    """``np.add.reduce`` of the float32 values of cases laid end to end (``read(i)``: case ``i``'s, ``lengths[i]``
    of them), bit for bit without the concatenation: numpy halves a long vector (at a multiple of 8) until blocks of
    ``_PW_BLOCK``; a half inside one case is numpy's own sum of that slice, a block across two cases is summed here."""

    def __init__(self, lengths: list[int], read: Callable[[int], np.ndarray]) -> None:
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.read = read
        self.cache: dict[int, np.ndarray] = {}

    def _case(self, i: int) -> np.ndarray:
        if i not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(min(self.cache))
            self.cache[i] = np.ascontiguousarray(self.read(i), np.float32)
        return self.cache[i]

    def _values(self, lo: int, hi: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts = []
        while lo < hi:
            end = min(hi, int(self.starts[i + 1]))
            if end > lo:
                parts.append(self._case(i)[lo - int(self.starts[i]):end - int(self.starts[i])])
            lo, i = end, i + 1
        return np.concatenate(parts)

    def _sum(self, lo: int, n: int) -> np.float32:
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        if lo + n <= int(self.starts[i + 1]):
            a = self._case(i)
            return np.add.reduce(a[lo - int(self.starts[i]):lo - int(self.starts[i]) + n])
        if n <= _PW_BLOCK:
            return _pairwise_block(self._values(lo, lo + n))
        n2 = n // 2
        n2 -= n2 % 8
        return np.float32(self._sum(lo, n2) + self._sum(lo + n2, n - n2))

    def total(self) -> np.float32:
        return self._sum(0, int(self.starts[-1]))


def pad_to(arr: np.ndarray, size: Sequence[int], what: str = "image", warn: bool = True) -> np.ndarray:
    """Pad the trailing spatial axes of ``arr`` up to ``size`` (edge-centred, zeros) and warn once."""
    spatial = arr.shape[-len(size):]
    need = [max(0, s - a) for a, s in zip(spatial, size)]
    if not any(need):
        return arr
    if warn:
        _warn_small(what, spatial, size)
    pad = [(0, 0)] * (arr.ndim - len(size)) + [(n // 2, n - n // 2) for n in need]
    return np.pad(arr, pad)


def _warn_small(what: str, spatial: Sequence[int], size: Sequence[int]) -> None:
    warnings.warn(f"{what} {tuple(spatial)} is smaller than the patch {tuple(size)}; padded with zeros",
                  MedlensWarning, stacklevel=3)


class _StoredSource:
    """A stored case as the sampler sees it: the grid padded up to the patch (``shape``), the padding before each
    axis (``before``), and reads of a patch box that touch only the chunks it overlaps."""

    def __init__(self, case: SegCase, patch: tuple[int, ...]) -> None:
        self.stored = cast(StoredCase, case.stored)
        grid = case.grid
        if any(g < p for g, p in zip(grid, patch)):
            _warn_small(f"image {case.path.name}", grid, patch)
        self.grid = np.array(grid)
        self.shape = tuple(max(g, p) for g, p in zip(grid, patch))
        self.before = np.array([(s - g) // 2 for s, g in zip(self.shape, grid)])
        self.n_fg = self.stored.n_foreground

    def foreground(self, j: int) -> np.ndarray:
        """The ``j``-th foreground voxel (C order), in the padded grid."""
        flat = int(cast(StoredVector, self.stored.foreground)[j])
        if not 0 <= flat < int(np.prod(self.grid)):
            raise DataError(f"foreground index {flat} is outside the grid {tuple(self.grid)}",
                            self.stored.mask.path)
        return np.array(np.unravel_index(flat, tuple(self.grid))) + self.before

    def read(self, start: np.ndarray, patch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Image (1, *patch) and mask (*patch) of the padded box at ``start``: the grid's part read, zeros around."""
        lo = np.maximum(start - self.before, 0)
        hi = np.minimum(start - self.before + np.array(patch), self.grid)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        at = tuple(slice(int(a - s + o), int(b - s + o)) for a, b, s, o in zip(lo, hi, start, self.before))
        x = np.zeros((1, *patch), np.float32)
        y = np.zeros(patch, np.uint8)
        x[(0, *at)] = self.stored.image.read_chunks(box)
        y[at] = self.stored.mask.read_chunks(box)
        return x, y


class PatchSampler:
    """Random training patches, reproducible from (seed, epoch, index).

    Cases are visited in turn; with probability ``foreground_ratio`` a patch is centred on a random
    foreground voxel of its case, otherwise anywhere. Images smaller than the patch are padded. A case in memory is
    cut from its arrays; a stored case (``SegCase.stored``) reads only the chunks the patch overlaps and its
    foreground voxel from the store's list of them: the same patches for the same seed.
    """

    def __init__(self, cases: list[SegCase], patch_size: Sequence[int], n_per_epoch: int,
                 foreground_ratio: float = 0.5, seed: int = 0) -> None:
        self.patch = tuple(int(p) for p in patch_size)
        dims = cases[0].dims
        if len(self.patch) != dims:
            raise ShapeError(f"segmentation.patch_size {list(self.patch)} has {len(self.patch)} sizes; "
                             f"the images are {dims}D")
        self.images: list[np.ndarray | None] = []
        self.masks: list[np.ndarray | None] = []
        self.fg: list[np.ndarray | None] = []
        self.stored: list[_StoredSource | None] = []
        for c in cases:
            if c.stored is not None:
                self.stored.append(_StoredSource(c, self.patch))
                self.images.append(None)
                self.masks.append(None)
                self.fg.append(None)
                continue
            img = pad_to(c.image, self.patch, f"image {c.path.name}")
            msk = pad_to(c.mask, self.patch, "mask", warn=False)
            self.stored.append(None)
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
        src = self.stored[k]
        if src is not None:
            shape, n_fg = src.shape, src.n_fg
        else:
            shape, n_fg = cast(np.ndarray, self.masks[k]).shape, len(cast(np.ndarray, self.fg[k]))
        if n_fg and rng.random() < self.ratio:
            j = int(rng.integers(n_fg))
            centre = src.foreground(j) if src is not None else \
                np.array(np.unravel_index(cast(np.ndarray, self.fg[k])[j], shape))
            start = centre - np.array(self.patch) // 2
        else:
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, self.patch)])
        start = np.clip(start, 0, np.array(shape) - np.array(self.patch))
        if src is not None:
            x, y = src.read(start, self.patch)
        else:
            sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, self.patch))
            x = np.ascontiguousarray(cast(np.ndarray, self.images[k])[(slice(None),) + sl])
            y = np.ascontiguousarray(cast(np.ndarray, self.masks[k])[sl])
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
