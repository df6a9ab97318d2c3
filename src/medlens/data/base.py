"""The dataset contract shared by every classification source.

A dataset holds its images as one array (N, C, H, W) or (N, C, D, H, W), one label per image,
a patient id per image (for patient-level splits) and a source reference per image. It never
trains; it hands out single ``Sample`` objects or whole batches as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch

from medlens.errors import DataError, ShapeError
from medlens.tasks import Task, get_task, list_tasks


def read_csv_checked(path, required: list[str], what: str = "CSV") -> pd.DataFrame:
    """Read a CSV with a one-line error for a missing file, an unreadable file or missing columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found", path)
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise DataError(f"not a readable CSV ({type(e).__name__}: {' '.join(str(e).split())[:120]})", path) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{what} lacks the column(s) {missing} (has {list(df.columns)})", path)
    return df


def line_numbers(rows, limit: int = 5) -> str:
    """CSV line numbers (the header is line 1) of data rows ``rows`` (0-based), the first few."""
    shown = ", ".join(str(int(r) + 2) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def refuse_blank_cells(df, columns: list[str], path, what: str = "manifest") -> None:
    """A one-line DataError naming the file and lines where a required cell is empty or NaN.

    pandas reads an empty cell as NaN, and ``str(NaN)`` would silently become a class, a patient or a
    file called "nan".
    """
    for col in columns:
        if col not in df.columns:
            continue
        cells = df[col]
        blank = cells.isna().to_numpy() | cells.astype(str).str.strip().eq("").to_numpy()
        rows = np.flatnonzero(blank)
        if len(rows):
            raise DataError(f"{what} has an empty '{col}' on line(s) {line_numbers(rows)}; "
                            "fill or remove those rows", path)


def confined_paths(root, names, path, column: str, allow_outside: bool = False) -> list:
    """``root / name`` for each name, refused (one line naming the CSV and line) when it resolves outside
    ``root``: ``..`` components, absolute paths and symlinks that lead out. ``allow_outside`` (config
    ``data.allow_outside_root``) lifts the check for manifests the user trusts."""
    root = Path(root)
    out = [root / str(n) for n in names]
    if allow_outside:
        return out
    base = root.resolve()
    for i, p in enumerate(out):
        try:
            inside = p.resolve().is_relative_to(base)
        except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte
            raise DataError(f"'{column}' on line {i + 2} is not a usable path ({type(e).__name__})", path) from None
        if not inside:
            raise DataError(f"'{column}' on line {i + 2} ({str(names[i])[:120]!r}) leads outside the image root "
                            f"{root}; list paths inside it or set data.allow_outside_root: true", path)
    return out


@dataclass
class Sample:
    """One image with its label, patient and source."""

    image: np.ndarray
    label: Any
    patient_id: str
    source: str


@runtime_checkable
class Dataset(Protocol):
    """The one dataset interface the engine, evaluation and explanation use (docs/ARCHITECTURE.md "One dataset
    interface"): ``ArrayDataset`` (images in memory) and ``medlens.data.nodules.PatchStoreDataset`` (patches
    on disk) satisfy it; a new data source returns splits of either, or of its own class with these members.
    ``isinstance(ds, Dataset)`` checks the members are there (not their types)."""

    labels: np.ndarray      # one label per case (int64 class index, or (N, K) multi-hot)
    patient_ids: np.ndarray  # per case, for patient-level splits and "seen in training" checks
    sources: np.ndarray     # per case, where it came from (file, series@position)
    task: str               # a registered per-case task name (``medlens.tasks``)
    class_names: list[str]
    name: str
    meta: dict

    def __len__(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def spatial_dims(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, ...]: ...

    @property
    def n_outputs(self) -> int: ...

    def class_counts(self) -> np.ndarray: ...

    def subset(self, idx, name: str | None = None) -> "Dataset": ...

    def batch(self, idx) -> tuple[Any, Any]:
        """``(x, y)`` tensors for the indices: x float32 model inputs, y the labels."""
        ...


@dataclass(init=False)
class ArrayDataset:
    """Images in memory, with labels, patient ids and sources.

    ``images`` is uint8 (scaled by 1/255 when batched) or float32 (used as is), channels first. Patient ids and
    sources left out are numbered from ``name``.
    """

    images: np.ndarray
    labels: np.ndarray
    task: str
    class_names: list[str]
    patient_ids: np.ndarray
    sources: np.ndarray
    name: str
    meta: dict

    def __init__(self, images: np.ndarray, labels: np.ndarray, task: str, class_names: list[str],
                 patient_ids: np.ndarray | None = None, sources: np.ndarray | None = None, name: str = "",
                 meta: dict | None = None) -> None:
        self.images, self.labels, self.task, self.class_names = images, labels, task, class_names
        self.name = name
        self.meta = {} if meta is None else meta
        per_case = tuple(t.name for t in list_tasks() if t.records_runs and not t.dense)  # one label per image
        if self.task not in per_case:
            raise DataError(f"unknown task '{self.task}' for dataset {self.name}; expected one of {per_case}")
        if self.images.ndim not in (4, 5):
            raise ShapeError(f"dataset {self.name}: images must be (N, C, H, W) or (N, C, D, H, W), "
                             f"got shape {self.images.shape}")
        n = len(self.images)
        self.labels = self.task_type.prepare_labels(self.labels, n)
        if len(self.labels) != n:
            raise ShapeError(f"dataset {self.name}: {n} images but {len(self.labels)} labels")
        self.patient_ids = np.array([f"{self.name}-{i}" for i in range(n)]) if patient_ids is None else patient_ids
        self.sources = np.array([f"{self.name}[{i}]" for i in range(n)]) if sources is None else sources

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.images[i], self.labels[i], str(self.patient_ids[i]), str(self.sources[i]))

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[2:])

    @property
    def task_type(self) -> Task:
        return get_task(self.task)

    @property
    def n_outputs(self) -> int:
        """Width of the model's output: 1 logit for binary, else one per class/label."""
        return self.task_type.n_outputs(len(self.class_names))

    def subset(self, idx: Sequence[int] | np.ndarray, name: str | None = None) -> "ArrayDataset":
        idx = np.asarray(idx)
        return ArrayDataset(self.images[idx], self.labels[idx], self.task, list(self.class_names),
                            self.patient_ids[idx], self.sources[idx], name or self.name, dict(self.meta))

    def batch(self, idx: Sequence[int] | np.ndarray):
        """Return ``(x, y)`` tensors for the given indices; x is float32 in [0, 1] for uint8 images."""
        idx = np.sort(np.asarray(idx)) if isinstance(self.images, np.memmap) else np.asarray(idx)
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = torch.from_numpy(self.labels[idx])
        return x, y

    def class_counts(self) -> np.ndarray:
        return self.task_type.class_counts(self.labels, len(self.class_names))


@dataclass
class SplitData:
    """train / val / test datasets of one source, plus how the split was made."""

    train: Dataset
    val: Dataset
    test: Dataset
    split_method: str = "official"
    # True: patient ids read from the data (a CSV column, data.patient_pattern, DICOM PatientID/StudyInstanceUID),
    # so a split made here keeps each patient in one split; False: each image its own patient (a per-image split);
    # None: a split the source gives (MedMNIST's official one), medlens states nothing about patients
    patients_known: bool | None = None
    # binary: the positive class (index 1) when the data say which (data.positive_class, a conventional negative
    # name beside it, or the source's own order); needs_positive: two classes named only alphabetically
    positive_class: str | None = None
    needs_positive: bool = False

    def get(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown split '{split}'; expected train, val or test")
        return getattr(self, split)

    @property
    def task(self) -> str:
        return self.train.task

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


class Preparer(Protocol):
    """How a loaded ``Image`` becomes a stored model input: the caller's, injected into the loaders
    (``medlens.transforms.preprocess.Preparer`` is the one medlens uses everywhere), so data reads files
    and labels without depending on the transforms above it."""

    def __call__(self, image, name: str | None = None) -> np.ndarray:
        """(C, *spatial): uint8 where 8-bit (``/ 255`` at batch time), else float32 in the model's scale."""
        ...

    def display(self, image) -> np.ndarray:
        """uint8 picture for overlays."""
        ...
