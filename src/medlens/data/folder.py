"""Image-folder (one sub-folder per class) and CSV-manifest datasets, with patient-level splits.

Patients come from the data: a manifest's patient column, ``data.patient_pattern`` (a regex whose group 1, or the
whole match, over each file's relative path is the patient), or the DICOM header (``PatientID``, else
``StudyInstanceUID``), keyed-hashed (``hash_patient``) before it leaves this module. Where none of these tells,
each image is its own patient and the split says so (``splits.PER_IMAGE``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, cast

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from medlens.data.base import (ArrayDataset, Preparer, SplitData, confined_paths, line_numbers, read_csv_checked,
                               refuse_blank_cells)
from medlens.data.catalog import BINARY, MULTICLASS, MULTILABEL
from medlens.data.labels import negative_first
from medlens.data.splits import PER_IMAGE, patient_split, split_method
from medlens.data.store import StoreImages, store_key, stored_images
from medlens.errors import DataError
from medlens.io import load
from medlens.tasks import REGRESSION_TASK
from medlens.io.formats import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_image_file, suffix_of  # noqa: F401
#                                                  (IMAGE_SUFFIXES: public)

REGRESSION = REGRESSION_TASK.name
KEY_ENV = "MEDLENS_PATIENT_KEY"  # an optional secret mixed into the key of the patient hash


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted) by the one suffix list of ``medlens.io.formats``;
    the ``.img`` half of an Analyze ``.hdr``/``.img`` pair is not listed twice."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    return [p for p in files if not (suffix_of(p) == ".img" and p.with_suffix(".hdr").is_file())]


def _load_images(paths: Iterable[Path], prepare: Preparer, progress: Callable | None = None) -> np.ndarray:
    """The images of ``paths`` as ``prepare`` makes them: a view through the prepared store (``data.store``: read
    and prepared once, in parallel; under ``build_data`` only after its selection) for a preparer the store can
    key, else decoded here, in memory."""
    paths = list(paths)
    if store_key(prepare) is not None:
        view: StoreImages = stored_images(paths, prepare, getattr(getattr(prepare, "spec", None), "spatial_dims", 2),
                                          progress)
        return cast(np.ndarray, view)  # array-like: what ArrayDataset does with its images, a view does too
    arrays = []
    for i, p in enumerate(paths):
        arrays.append(prepare(load(p), str(p)))
        if progress:
            progress(i + 1, len(paths))
    if any(a.dtype != np.uint8 for a in arrays):
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays]
    return np.stack(arrays)


def hash_patient(key: bytes, kind: str, value: str) -> str:
    """A patient (or study) identifier as ``patient-<16 hex>``: HMAC-SHA256 under ``key``, never the value."""
    return "patient-" + hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]


def _dicom_header(path: Path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["PatientID", "StudyInstanceUID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError):
        return None


def dicom_patients(paths: list[Path]) -> np.ndarray | None:
    """Keyed hashes of each DICOM file's ``PatientID`` (its ``StudyInstanceUID`` where the ID is blank); None unless
    every file is DICOM and names one or the other. The key is SHA-256 over the files' SOP Instance UIDs (and
    ``$MEDLENS_PATIENT_KEY`` when set): the same data give the same ids, which tell nothing without the files."""
    if not paths or any(suffix_of(p) not in DICOM_SUFFIXES for p in paths):
        return None
    found = []
    for p in paths:
        h = _dicom_header(p)
        if h is None:
            return None
        pid, study = str(h.get("PatientID", "") or "").strip(), str(h.get("StudyInstanceUID", "") or "").strip()
        if not pid and not study:
            return None
        found.append(("P", pid) if pid else ("S", study))
        found[-1] += (str(h.get("SOPInstanceUID", "") or p.name),)
    key = hashlib.sha256("\n".join(sorted(f[2] for f in found)).encode()
                         + os.environ.get(KEY_ENV, "").encode()).digest()
    return np.array([hash_patient(key, kind, value) for kind, value, _ in found])


def patients_of(paths: list[Path], names: list[str], pattern: str | None, where: Path) -> np.ndarray | None:
    """Patient ids of image files from the data: ``pattern`` over each relative path in ``names``, else the DICOM
    header (``dicom_patients``); None when neither tells."""
    if pattern:
        rx, out = re.compile(pattern), []
        for n in names:
            m = rx.search(n)
            if m is None:
                raise DataError(f"{n}: the path does not match data.patient_pattern {pattern!r}", where)
            out.append(m.group(1) if m.groups() else m.group(0))
        return np.array(out)
    return dicom_patients(paths)


def _ordered(classes: list[str]) -> tuple[list[str], dict]:
    """Class names by name, a conventional negative first (``labels.negative_first``), and SplitData's fields."""
    names, decided = negative_first(sorted(classes))
    binary = len(names) == 2
    return names, {"positive_class": str(names[1]) if binary and decided else None,
                   "needs_positive": binary and not decided}


def _split(ds: ArrayDataset, val: float, test: float, seed: int, known: bool) -> SplitData:
    tr, va, te = patient_split(ds.labels, ds.patient_ids, val=val, test=test, seed=seed)
    return SplitData(ds.subset(tr, f"{ds.name}/train"), ds.subset(va, f"{ds.name}/val"),
                     ds.subset(te, f"{ds.name}/test"), split_method=split_method(seed, val, test, known),
                     patients_known=known)


def _no_leak(parts: dict[str, ArrayDataset], where: Path) -> None:
    seen: dict[str, str] = {}
    for split, d in parts.items():
        for pid in set(map(str, d.patient_ids)):
            if seen.setdefault(pid, split) != split:
                raise DataError(f"a patient is in both {seen[pid]} and {split} (patient ids are not shown)", where)


def load_image_folder(root: str | Path, prepare: Preparer, *, val: float = 0.1,
                      test: float = 0.2, seed: int = 0, progress: Callable | None = None,
                      patient_pattern: str | None = None) -> SplitData:
    """A Keras ``flow_from_directory`` layout: ``root/<class>/<image>``.

    If ``root`` has ``train/``, ``val/`` and ``test/`` sub-folders, they are used as the split (refused when a
    known patient is in two); otherwise a stratified split keeps each patient in one split. Patients come from
    ``patient_pattern`` over ``<class>/<file>`` or from DICOM headers; without either each file is its own patient
    (a per-image split, which ``SplitData.patients_known`` False and the split method say).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found", root)
    if all((root / s).is_dir() for s in ("train", "val", "test")):
        loaded = {s: _folder_dataset(root / s, prepare, progress, f"{root.name}/{s}", patient_pattern)
                  for s in ("train", "val", "test")}
        parts = {s: d for s, (d, _, _) in loaded.items()}
        names = parts["train"].class_names
        for s, d in parts.items():
            if d.class_names != names:
                raise DataError(f"classes in {s}/ {d.class_names} differ from train/ {names}", root / s)
        known = all(k for _, k, _ in loaded.values())
        if known:
            _no_leak(parts, root)
        return SplitData(parts["train"], parts["val"], parts["test"],
                         split_method="folders train/val/test" + ("" if known else f" ({PER_IMAGE})"),
                         patients_known=known, **loaded["train"][2])
    ds, known, fields = _folder_dataset(root, prepare, progress, root.name, patient_pattern)
    return replace(_split(ds, val, test, seed, known), **fields)


def _folder_dataset(root: Path, prepare: Preparer, progress, name: str,
                    patient_pattern: str | None = None) -> tuple[ArrayDataset, bool, dict]:
    """The folder's dataset, whether its patients are known, and the class fields of ``SplitData``."""
    found = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    classes, fields = _ordered(found)
    if not classes:
        raise DataError("no class sub-folders (expected root/<class>/<images>)", root)
    if len(classes) < 2:
        raise DataError(f"only one class folder ({classes[0]}); classification needs at least two", root)
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = list_images(root / c)
        if not files:
            raise DataError(f"class '{c}' has no images", root / c)
        paths += files
        labels += [ci] * len(files)
    rel = [p.relative_to(root).as_posix() for p in paths]
    pids = patients_of(paths, rel, patient_pattern, root)
    images = _load_images(paths, prepare, progress)
    ds = ArrayDataset(images, np.array(labels), BINARY if len(classes) == 2 else MULTICLASS, classes,
                      patient_ids=pids if pids is not None else np.array(rel),
                      sources=np.array([str(p) for p in paths]), name=name)
    return ds, pids is not None, fields


def load_csv_manifest(csv_path: str | Path, prepare: Preparer, *, image_root: str | Path | None = None,
                      path_column: str = "path", label_column: str = "label", patient_column: str = "patient_id",
                      suffix: str = "", val: float = 0.1, test: float = 0.2, seed: int = 0,
                      progress: Callable | None = None, allow_outside_root: bool = False,
                      patient_pattern: str | None = None, label_columns: list[str] | None = None,
                      target_column: str | None = None) -> SplitData:
    """A manifest ``path,label[,patient_id][,split]`` such as Kaggle's DR ``trainLabels.csv``.

    ``label_columns`` (several 0/1 columns, one per label) make it a multi-label dataset; ``target_column`` (one
    numeric column) a regression dataset: either replaces ``label_column``. A cell that is not 0/1, not a finite
    number or blank is refused with the file and its line.

    Paths are relative to ``image_root`` (default: the CSV's folder) and must stay inside it (no ``..``,
    absolute paths or symlinks that lead out) unless ``allow_outside_root``; ``suffix`` is appended
    (Kaggle lists ``image`` without ``.jpeg``). Empty paths, labels or patient ids are refused with their
    line numbers. With a ``split`` column, it is used; otherwise a stratified split keeps every patient
    in one split. Patients: the ``patient_column``, else ``patient_pattern`` over the listed paths, else the DICOM
    headers; else each row is its own patient (a per-image split, said in the split method).
    """
    csv_path = Path(csv_path)
    targets = list(label_columns) if label_columns else [target_column] if target_column else [label_column]
    df = read_csv_checked(csv_path, [path_column, *targets], "manifest")
    if df.empty:
        raise DataError("manifest has no rows", csv_path)
    refuse_blank_cells(df, [path_column, *targets, patient_column], csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    names = [f"{p}{suffix}" for p in df[path_column].astype(str)]
    paths = confined_paths(root, names, csv_path, path_column, allow_outside_root)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{len(missing)} listed image(s) missing, first: {missing[0]}", csv_path)
    if label_columns:
        labels, classes, task, fields = _multi_hot(df, list(label_columns), csv_path), list(label_columns), \
            MULTILABEL, {}
    elif target_column:
        labels, classes, task, fields = _numeric(df, target_column, csv_path), [target_column], REGRESSION, {}
    else:
        raw = cast(pd.Series, df[label_column])  # one column label: a Series (pandas' hints also allow a frame)
        classes, fields = _ordered(raw.unique().tolist())
        if len(classes) < 2:
            raise DataError(f"only one label value ({classes[0]}); classification needs at least two", csv_path)
        labels = raw.map({c: i for i, c in enumerate(classes)}).to_numpy()
        task = BINARY if len(classes) == 2 else MULTICLASS
    known_pids = df[patient_column].astype(str).to_numpy() if patient_column in df.columns else \
        patients_of(paths, names, patient_pattern, csv_path)
    known = known_pids is not None
    pids = known_pids if known_pids is not None else np.array([str(p) for p in df[path_column]])
    images = _load_images(paths, prepare, progress)
    ds = ArrayDataset(images, labels, task, [str(c) for c in classes],
                      patient_ids=pids, sources=np.array([str(p) for p in paths]), name=csv_path.stem)
    if "split" in df.columns:
        s = df["split"].astype(str).str.strip().str.lower().to_numpy()
        odd = np.flatnonzero(~np.isin(s, ["train", "val", "test"]))
        if len(odd):  # a row in no split would silently drop out of the data
            raise DataError(f"'split' is not train, val or test on line(s) {line_numbers(odd)} "
                            f"(e.g. {str(df['split'].iloc[odd[0]])[:40]!r})", csv_path)
        parts = {k: np.flatnonzero(s == k) for k in ("train", "val", "test")}
        empty = [k for k, v in parts.items() if len(v) == 0]
        if empty:
            raise DataError(f"'split' column has no rows for {empty}", csv_path)
        leak = set(pids[parts["train"]]) & (set(pids[parts["val"]]) | set(pids[parts["test"]]))
        if leak:
            raise DataError(f"patient(s) in both train and val/test, e.g. {sorted(leak)[0]}", csv_path)
        return SplitData(*(ds.subset(parts[k], f"{ds.name}/{k}") for k in ("train", "val", "test")),
                         split_method="manifest 'split' column" + ("" if known else f" ({PER_IMAGE})"),
                         patients_known=known, **fields)
    return replace(_split(ds, val, test, seed, known), **fields)


def _multi_hot(df: pd.DataFrame, columns: list[str], where: Path) -> np.ndarray:
    """(N, K) 0/1 labels of ``columns``; a cell that is not 0 or 1 (or a label never present) is a one-line error."""
    out = np.zeros((len(df), len(columns)), np.float32)
    for j, col in enumerate(columns):
        cells = df[col].astype(str).str.strip().str.lower()
        value = cells.map({"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1})
        bad = np.flatnonzero(value.isna().to_numpy())
        if len(bad):
            raise DataError(f"label column '{col}' is {str(df[col].iloc[bad[0]])[:40]!r} on line(s) "
                            f"{line_numbers(bad)}; a label column holds 0 or 1", where)
        out[:, j] = value.to_numpy(float)
        if out[:, j].min() == out[:, j].max():
            raise DataError(f"label column '{col}' is {int(out[0, j])} on every row; a label needs both 0 and 1 "
                            "cases", where)
    return out


def _numeric(df: pd.DataFrame, column: str, where: Path) -> np.ndarray:
    """The finite numbers of ``column``; a cell that is not one is a one-line error naming its line."""
    values = np.asarray(pd.to_numeric(df[column], errors="coerce"), dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(f"target column '{column}' is {str(df[column].iloc[bad[0]])[:40]!r} on line(s) "
                        f"{line_numbers(bad)}; a regression target is a finite number", where)
    if values.min() == values.max():
        raise DataError(f"target column '{column}' is {values[0]:g} on every row; nothing to learn", where)
    return np.asarray(values, np.float32)


def manifest_columns(csv_path: str | Path, columns: list[str], *, image_root: str | Path | None = None,
                     path_column: str = "path", suffix: str = "",
                     allow_outside_root: bool = False) -> dict[str, dict[str, str]]:
    """Extra manifest columns (sex, age band, site...) by source path, as ``load_csv_manifest`` names
    each sample's source: ``{source: {column: value}}``. A missing column is a one-line error."""
    csv_path = Path(csv_path)
    df = read_csv_checked(csv_path, [path_column, *columns], "manifest")
    root = Path(image_root) if image_root else csv_path.parent
    paths = confined_paths(root, [f"{p}{suffix}" for p in df[path_column].astype(str)], csv_path, path_column,
                           allow_outside_root)
    values = df[columns].astype(str).where(df[columns].notna(), "(blank)")
    return {str(p): dict(zip(columns, row)) for p, row in zip(paths, values.itertuples(index=False))}
