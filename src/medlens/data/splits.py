"""The one patient-level splitter of medlens: every source without an official split uses it.

``patient_split`` deals patients (groups) into ``k`` folds with ``StratifiedGroupKFold``, so that each
fold holds whole patients and about the same class mix, and then gives the first folds to test, the
next ones to validation and the rest to training. ``k`` (at most ``MAX_FOLDS``, at most the number
of patients) is the smallest whose fold counts match the requested fractions within ``TOLERANCE``.
The same seed and the same inputs always give the same split.

``cv_folds`` deals the pooled training and validation cases of a planned run into patient-disjoint folds for
cross-validation (issue 30), and ``cv_splits`` gives each fold model its data; ``Pooled`` is that pool as one
dataset, without copying images; ``Sealed`` keeps the test split's images out of reach while planning and fold
training run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from medlens.data.base import SplitData
from medlens.errors import DataError
from medlens.tasks import get_task

MAX_FOLDS = 20     # fractions are matched to 1/20 at worst
TOLERANCE = 0.02   # summed |folds/k - fraction| accepted before trying more folds


def _nearest(x: float) -> int:
    return int(np.floor(x + 0.5))


def _fold_counts(k: int, val: float, test: float) -> tuple[int, int] | None:
    """Folds for validation and test out of ``k``: each non-zero fraction at least one, training at least one."""
    m_val = max(1, _nearest(val * k)) if val > 0 else 0
    m_test = max(1, _nearest(test * k)) if test > 0 else 0
    while m_val + m_test >= k:
        if m_val >= m_test and m_val > 1:
            m_val -= 1
        elif m_test > 1:
            m_test -= 1
        else:
            return None
    return m_val, m_test


def fold_plan(n_groups: int, val: float, test: float) -> tuple[int, int, int]:
    """``(k, val_folds, test_folds)``: the fewest folds whose counts match the fractions."""
    need = 1 + (val > 0) + (test > 0)
    if n_groups < need:
        raise DataError(f"{n_groups} patient(s) are too few for a patient-level split with "
                        f"{'validation and test' if need == 3 else 'a hold-out'}: at least {need} patients "
                        "are needed")
    best: tuple[float, int, int, int] | None = None
    for k in range(2, min(n_groups, MAX_FOLDS) + 1):
        counts = _fold_counts(k, val, test)
        if counts is None:
            continue
        err = abs(counts[0] / k - val) + abs(counts[1] / k - test)
        if best is None or err < best[0] - 1e-12:
            best = (err, k, *counts)
        if err <= TOLERANCE:
            break
    if best is None:  # unreachable: k = need always fits
        raise DataError(f"no patient-level split of {n_groups} patients fits val {val} and test {test}")
    return best[1], best[2], best[3]


def _strat_key(labels, n: int) -> np.ndarray:
    """One integer class per sample (multi-label or one-hot targets: their first column)."""
    if labels is None:
        return np.zeros(n, np.int64)
    a = np.asarray(labels)
    if len(a) != n:
        raise DataError(f"{len(a)} labels for {n} patient ids")
    a = a.reshape(n, -1)[:, 0] if a.ndim > 1 else a
    return np.unique(a, return_inverse=True)[1].reshape(n)


def _folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Indices of ``k`` patient-disjoint folds, stratified by ``y`` as far as the grouping allows."""
    if np.bincount(y).max() < k:  # no class fills k folds: sklearn refuses; balance sizes only
        y = np.zeros_like(y)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [np.asarray(f, dtype=np.int64) for _, f in cv.split(np.zeros(len(y)), y, groups)]


def patient_split(labels, patient_ids, val: float = 0.1, test: float = 0.2, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted indices of train, val and test such that no patient appears in two splits.

    ``labels`` (one per sample; ``None`` when there is nothing to stratify on) are stratified as far
    as the patient grouping allows. ``val`` and ``test`` are fractions of the samples.
    """
    groups = np.asarray(patient_ids).astype(str)
    n = len(groups)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(f"split fractions val {val} and test {test} must be >= 0 and sum below 1")
    y = _strat_key(labels, n)
    idx = np.arange(n)
    if val == 0 and test == 0:
        return idx, idx[:0], idx[:0]
    k, m_val, m_test = fold_plan(len(np.unique(groups)), val, test)
    folds = _folds(y, groups, k, seed)
    test_idx = np.concatenate(folds[:m_test] + [idx[:0]])
    val_idx = np.concatenate(folds[m_test:m_test + m_val] + [idx[:0]])
    train_idx = np.setdiff1d(idx, np.concatenate([test_idx, val_idx]))
    for name, part, wanted in (("training", train_idx, True), ("validation", val_idx, val > 0),
                               ("test", test_idx, test > 0)):
        if wanted and len(part) == 0:
            raise DataError(f"the patient-level split of {len(np.unique(groups))} patients left the {name} "
                            "split empty; add patients or change data.val_fraction/test_fraction")
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)


PER_IMAGE = "per-image split: one patient may appear in several splits"


def split_method(seed: int, val: float, test: float, patients_known: bool = True) -> str:
    """How ``patient_split`` split a source, for ``SplitData.split_method`` and the report: patient-level only
    when the patients are known (each file its own group otherwise, which ``PER_IMAGE`` says)."""
    how = f"seed {seed}, val {val:.0%}, test {test:.0%}"
    return f"stratified patient-level split ({how})" if patients_known else f"stratified {PER_IMAGE} ({how})"


def cv_folds(labels, patient_ids, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` folds (sorted indices) for cross-validation: every case in exactly one fold, no patient (group) in
    two, classes stratified as far as the grouping allows (``StratifiedGroupKFold``). The same seed and inputs
    always give the same folds."""
    groups = np.asarray(patient_ids).astype(str)
    n_groups = len(np.unique(groups))
    if k < 2 or n_groups < k:
        raise DataError(f"{n_groups} patient(s) cannot be dealt into {k} cross-validation folds: at least {k} "
                        "patients and 2 folds are needed")
    folds = [np.sort(f) for f in _folds(_strat_key(labels, len(groups)), groups, k, seed)]
    if any(len(f) == 0 for f in folds):  # unreachable with n_groups >= k, kept as a guard
        raise DataError(f"a cross-validation fold of {n_groups} patients came out empty")
    return folds


def cv_splits(data: SplitData, k: int, seed: int = 0, test=None) -> tuple["Pooled", list[np.ndarray], list[SplitData]]:
    """``data``'s train and validation splits pooled (train first), its ``k`` folds (``cv_folds``) and, for each
    fold i, a ``SplitData`` that trains on the other folds and holds out fold i: a fold model's data. ``test``
    replaces the test split when given (``Sealed``); every other field of ``data`` is kept."""
    pool = Pooled([data.train, data.val], "train+val")
    folds = cv_folds(pool.labels, pool.patient_ids, k, seed)
    everyone = np.arange(len(pool))
    return pool, folds, [replace(data, train=pool.subset(np.setdiff1d(everyone, f), f"cv{i}-train"),
                                 val=pool.subset(f, f"cv{i}-held-out"), test=data.test if test is None else test)
                         for i, f in enumerate(folds)]


class Pooled:
    """Several datasets of one task seen as one without copying their images (train + validation pooled for
    cross-validation); ``subset`` gives a view. Satisfies ``data.base.Dataset``."""

    def __init__(self, parts: list, name: str = "pooled", rows: np.ndarray | None = None) -> None:
        first = parts[0]
        for p in parts[1:]:
            if not get_task(first.task).same_outputs(first.class_names, p.task, p.class_names) \
                    or tuple(p.image_shape) != tuple(first.image_shape) or p.in_channels != first.in_channels:
                raise DataError(f"datasets {first.name} and {p.name} differ in task, classes or input shape and "
                                "cannot be pooled")
        self.parts = list(parts)
        part = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(parts)])
        row = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
        self._rows = np.arange(len(part)) if rows is None else np.asarray(rows, np.int64)
        self._part, self._row = part[self._rows], row[self._rows]
        self.task, self.class_names, self.name = first.task, list(first.class_names), name
        self.meta = dict(getattr(first, "meta", {}) or {})
        self.labels = np.concatenate([np.asarray(p.labels) for p in parts])[self._rows]
        self.patient_ids = np.concatenate([np.asarray(p.patient_ids).astype(str) for p in parts])[self._rows]
        self.sources = np.concatenate([np.asarray(p.sources).astype(str) for p in parts])[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def in_channels(self) -> int:
        return self.parts[0].in_channels

    @property
    def spatial_dims(self) -> int:
        return self.parts[0].spatial_dims

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.parts[0].image_shape)

    @property
    def n_outputs(self) -> int:
        return self.parts[0].n_outputs

    def class_counts(self) -> np.ndarray:
        return get_task(self.task).class_counts(self.labels, len(self.class_names))

    def subset(self, idx, name: str | None = None) -> "Pooled":
        return Pooled(self.parts, name or self.name, self._rows[np.asarray(idx, np.int64)])

    def batch(self, idx):
        """``(x, y)`` in the order of ``idx``, each part asked for its rows in ascending order."""
        idx = np.asarray(idx, np.int64)
        xs, ys = None, None
        for i, p in enumerate(self.parts):
            at = np.nonzero(self._part[idx] == i)[0]
            if len(at) == 0:
                continue
            rows = self._row[idx[at]]
            order = np.argsort(rows, kind="stable")
            x, y = p.batch(rows[order])
            if xs is None or ys is None:
                xs = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype)
                ys = torch.empty((len(idx), *y.shape[1:]), dtype=y.dtype)
            xs[at[order]], ys[at[order]] = x, y
        if xs is None or ys is None:
            raise DataError(f"empty batch requested from {self.name}")
        return xs, ys


class Sealed:
    """The official test split while a plan is made or fold models are trained (issue 30): its size and class
    counts can be read, its images and labels cannot (``DataError`` naming the step that tried)."""

    def __init__(self, ds, step: str) -> None:
        self._ds, self._step = ds, step
        self.task, self.class_names, self.name = ds.task, list(ds.class_names), ds.name

    def __len__(self) -> int:
        return len(self._ds)

    def class_counts(self) -> np.ndarray:
        return self._ds.class_counts()

    def __getattr__(self, attr: str):
        if attr.startswith("__"):   # Python's own protocol look-ups (copy, pickle, numpy) stay ordinary misses
            raise AttributeError(attr)
        raise DataError(f"{self._step} must not read the test split ({attr}): it is kept for the final evaluation")
