"""Stratified, patient-level splits for sources that have no official split."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medlens.errors import DataError


def _carve(labels: np.ndarray, groups: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held) with about ``frac`` of the patients held out, stratified by label."""
    n_groups = len(np.unique(groups))
    k = max(2, int(round(1.0 / frac)))
    if n_groups < k:
        raise DataError(f"only {n_groups} patients: too few for a {frac:.0%} patient-level hold-out")
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= k else np.zeros_like(labels)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    rest, held = next(cv.split(np.zeros(len(labels)), strat, groups))
    return rest, held


def patient_split(labels, patient_ids, val: float = 0.1, test: float = 0.2, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val and test, such that no patient appears in two splits.

    Labels are stratified as far as the patient grouping allows (``StratifiedGroupKFold``).
    For multi-label targets pass the first label column or any single stratification key.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(int)
    groups = np.asarray(patient_ids)
    idx = np.arange(len(labels))
    if test > 0:
        rest, test_idx = _carve(labels, groups, test, seed)
    else:
        rest, test_idx = idx, idx[:0]
    if val > 0:
        r2, v2 = _carve(labels[rest], groups[rest], val / (1.0 - test), seed + 1)
        train_idx, val_idx = rest[r2], rest[v2]
    else:
        train_idx, val_idx = rest, rest[:0]
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)
