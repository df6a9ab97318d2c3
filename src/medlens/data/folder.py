"""Image-folder (one sub-folder per class) and CSV-manifest datasets, with patient-level splits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, cast

import numpy as np
import pandas as pd

from medlens.data.base import (ArrayDataset, Preparer, SplitData, confined_paths, line_numbers, read_csv_checked,
                               refuse_blank_cells)
from medlens.data.catalog import BINARY, MULTICLASS
from medlens.data.splits import patient_split, split_method
from medlens.errors import DataError
from medlens.io import load
from medlens.io.formats import IMAGE_SUFFIXES, is_image_file, suffix_of  # noqa: F401  (IMAGE_SUFFIXES: public)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted) by the one suffix list of ``medlens.io.formats``;
    the ``.img`` half of an Analyze ``.hdr``/``.img`` pair is not listed twice."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    return [p for p in files if not (suffix_of(p) == ".img" and p.with_suffix(".hdr").is_file())]


def _load_images(paths: Iterable[Path], prepare: Preparer, progress: Callable | None = None) -> np.ndarray:
    arrays = []
    paths = list(paths)
    for i, p in enumerate(paths):
        arrays.append(prepare(load(p), str(p)))
        if progress:
            progress(i + 1, len(paths))
    if any(a.dtype != np.uint8 for a in arrays):
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays]
    return np.stack(arrays)


def _split(ds: ArrayDataset, val: float, test: float, seed: int) -> SplitData:
    tr, va, te = patient_split(ds.labels, ds.patient_ids, val=val, test=test, seed=seed)
    return SplitData(ds.subset(tr, f"{ds.name}/train"), ds.subset(va, f"{ds.name}/val"),
                     ds.subset(te, f"{ds.name}/test"), split_method=split_method(seed, val, test))


def load_image_folder(root: str | Path, prepare: Preparer, *, val: float = 0.1,
                      test: float = 0.2, seed: int = 0, progress: Callable | None = None) -> SplitData:
    """A Keras ``flow_from_directory`` layout: ``root/<class>/<image>``.

    If ``root`` has ``train/``, ``val/`` and ``test/`` sub-folders, they are used as the split;
    otherwise a stratified split is made (each file its own patient, as the layout has no ids).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found", root)
    if all((root / s).is_dir() for s in ("train", "val", "test")):
        parts = {s: _folder_dataset(root / s, prepare, progress, name=f"{root.name}/{s}")
                 for s in ("train", "val", "test")}
        names = parts["train"].class_names
        for s, d in parts.items():
            if d.class_names != names:
                raise DataError(f"classes in {s}/ {d.class_names} differ from train/ {names}", root / s)
        return SplitData(parts["train"], parts["val"], parts["test"], split_method="folders train/val/test")
    return _split(_folder_dataset(root, prepare, progress, name=root.name), val, test, seed)


def _folder_dataset(root: Path, prepare: Preparer, progress, name: str) -> ArrayDataset:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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
    images = _load_images(paths, prepare, progress)
    return ArrayDataset(images, np.array(labels), BINARY if len(classes) == 2 else MULTICLASS, classes,
                        patient_ids=np.array([str(p.relative_to(root)) for p in paths]),
                        sources=np.array([str(p) for p in paths]), name=name)


def load_csv_manifest(csv_path: str | Path, prepare: Preparer, *, image_root: str | Path | None = None,
                      path_column: str = "path", label_column: str = "label", patient_column: str = "patient_id",
                      suffix: str = "", val: float = 0.1, test: float = 0.2, seed: int = 0,
                      progress: Callable | None = None, allow_outside_root: bool = False) -> SplitData:
    """A manifest ``path,label[,patient_id][,split]`` such as Kaggle's DR ``trainLabels.csv``.

    Paths are relative to ``image_root`` (default: the CSV's folder) and must stay inside it (no ``..``,
    absolute paths or symlinks that lead out) unless ``allow_outside_root``; ``suffix`` is appended
    (Kaggle lists ``image`` without ``.jpeg``). Empty paths, labels or patient ids are refused with their
    line numbers. With a ``split`` column, it is used; otherwise a stratified split keeps every patient
    in one split.
    """
    csv_path = Path(csv_path)
    df = read_csv_checked(csv_path, [path_column, label_column], "manifest")
    if df.empty:
        raise DataError("manifest has no rows", csv_path)
    refuse_blank_cells(df, [path_column, label_column, patient_column], csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    names = [f"{p}{suffix}" for p in df[path_column].astype(str)]
    paths = confined_paths(root, names, csv_path, path_column, allow_outside_root)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{len(missing)} listed image(s) missing, first: {missing[0]}", csv_path)
    raw = cast(pd.Series, df[label_column])  # one column label: a Series (pandas' hints also allow a frame)
    classes = sorted(raw.unique().tolist())
    if len(classes) < 2:
        raise DataError(f"only one label value ({classes[0]}); classification needs at least two", csv_path)
    labels = raw.map({c: i for i, c in enumerate(classes)}).to_numpy()
    pids = df[patient_column].astype(str).to_numpy() if patient_column in df.columns else np.array(
        [str(p) for p in df[path_column]])
    images = _load_images(paths, prepare, progress)
    ds = ArrayDataset(images, labels, BINARY if len(classes) == 2 else MULTICLASS, [str(c) for c in classes],
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
                         split_method="manifest 'split' column")
    return _split(ds, val, test, seed)


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
