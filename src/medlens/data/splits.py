"""The one patient-level splitter of medlens: every source without an official split uses it.

``patient_split`` deals patients (groups) into ``k`` folds with ``StratifiedGroupKFold``, so that each
fold holds whole patients and about the same class mix, and then gives the first folds to test, the
next ones to validation and the rest to training. ``k`` (at most ``MAX_FOLDS``, at most the number
of patients) is the smallest whose fold counts match the requested fractions within ``TOLERANCE``.
The same seed and the same inputs always give the same split.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medlens.errors import DataError

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
