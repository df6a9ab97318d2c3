"""Per-subgroup metrics (sex, age band, site, scanner... from CSV-manifest columns) with CIs and gaps.

Each group of each column is scored like the whole split, at the same validation-chosen threshold,
with its own bootstrap CIs. The largest gap between groups is given per metric. Groups smaller than
``evaluation.min_subgroup`` or holding a single class are flagged: their metrics are unreliable or
undefined (AUC needs both classes).
"""

from __future__ import annotations

import warnings

import numpy as np

from medlens.errors import MedlensWarning
from medlens.evaluation.metrics import compute_metrics

MAIN = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "macro_f1")


def subgroup_metrics(task: str, y: np.ndarray, p: np.ndarray, threshold: float | None,
                     groups: dict[str, np.ndarray], n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                     min_n: int = 30) -> dict:
    """``{column: {"groups": [{value, n, n_per_class, metrics, warnings}], "gaps": {metric: {...}}}}``."""
    y, p = np.asarray(y), np.asarray(p)
    out: dict = {}
    for col, values in groups.items():
        values = np.asarray(values).astype(str)
        rows = []
        for v in sorted(set(values.tolist())):
            idx = np.flatnonzero(values == v)
            yy = y[idx].astype(int)
            n_cls = np.bincount(yy, minlength=2 if p.ndim == 1 else p.shape[1]).tolist()
            notes = []
            if len(idx) < min_n:
                notes.append(f"only {len(idx)} cases (< {min_n}): wide or unstable intervals")
            if len(np.unique(yy)) < 2:
                notes.append("a single class: AUC and one of sensitivity/specificity are undefined")
            m = compute_metrics(task, yy, p[idx], threshold, n_boot, ci, seed)["metrics"]
            rows.append({"value": v, "n": int(len(idx)), "n_per_class": n_cls,
                         "metrics": {k: m[k] for k in MAIN if k in m}, "warnings": notes})
            for note in notes:
                warnings.warn(f"subgroup {col}={v}: {note}", MedlensWarning, stacklevel=2)
        gaps = {}
        for k in MAIN:
            vals = [(r["metrics"][k]["value"], r["value"]) for r in rows
                    if k in r["metrics"] and np.isfinite(r["metrics"][k]["value"])]
            if len(vals) >= 2:
                (lo, glo), (hi, ghi) = min(vals), max(vals)
                gaps[k] = {"gap": float(hi - lo), "lowest": glo, "highest": ghi}
        out[col] = {"groups": rows, "gaps": gaps}
    return out
