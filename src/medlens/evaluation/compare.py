"""Paired comparison of runs evaluated on the same cases: DeLong, McNemar and bootstrap differences.

- **DeLong** (DeLong, DeLong & Clarke-Pearson 1988) for the difference of two correlated ROC AUCs, computed
  with the fast midrank algorithm of Sun & Xu (IEEE Signal Processing Letters 21(11), 2014): the
  structural components V10/V01 come from three rankings per model instead of an m x n comparison.
  It gives the AUC difference, its standard error, a two-sided p-value and a normal-theory CI.
- **McNemar** at each run's own operating point (its validation-chosen threshold, or the argmax): the
  exact binomial test on the discordant pairs.
- **Paired bootstrap**: every metric's difference (A - B) with a percentile CI, resampling cases once
  for both runs so the pairing is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from scipy import stats

from medlens.errors import DataError, MedlensError
from medlens.evaluation.metrics import binary_metrics, bootstrap_ci, multiclass_metrics
from medlens.run import Run
from medlens.tasks import get_task


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,) and structural components V10 (k, m) and V01 (k, n) of ``scores`` (k, N) by Sun & Xu."""
    y = np.asarray(y).astype(int).ravel()
    scores = np.atleast_2d(np.asarray(scores, np.float64))
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise DataError("DeLong needs both classes among the compared cases")
    aucs, v10, v01 = [], [], []
    for r in range(len(scores)):
        tz = _midrank(np.concatenate([pos[r], neg[r]]))
        tx, ty = _midrank(pos[r]), _midrank(neg[r])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    return np.array(aucs), np.array(v10), np.array(v01)


def delong_test(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, ci: float = 0.95) -> dict[str, float]:
    """Paired DeLong test of AUC(A) - AUC(B) on the same cases."""
    aucs, v10, v01 = delong_components(y, np.vstack([p_a, p_b]))
    m, n = v10.shape[1], v01.shape[1]
    s = np.cov(v10) / m + np.cov(v01) / n
    var = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0:
        z, p = (0.0, 1.0) if diff == 0 else (float("inf"), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    q = float(stats.norm.ppf(0.5 + ci / 2))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "se": se, "z": float(z),
            "p_value": p, "ci_low": diff - q * se, "ci_high": diff + q * se}


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test: A right and B wrong (b) against A wrong and B right (c)."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"a_right_b_wrong": b, "a_wrong_b_right": c, "p_value": p}


@dataclass
class RunPredictions:
    """One run's test predictions, as written by its evaluation (``predictions.csv``)."""

    name: str
    task: str
    class_names: list[str]
    threshold: float | None
    sources: np.ndarray
    labels: np.ndarray
    probs: np.ndarray           # (N,) binary or (N, K)
    calibration: str | None

    def correct(self) -> np.ndarray:
        return get_task(self.task).hard_predictions(self.probs, self.threshold) == self.labels

    def metrics(self, idx: np.ndarray) -> dict[str, float]:
        """Metrics at the run's operating point (the MedMNIST-evaluator ACC, defined on uncalibrated
        outputs that predictions.csv does not hold, is left out)."""
        task = get_task(self.task)
        if task.has_threshold:
            if self.threshold is None:
                raise MedlensError(f"run {self.name} records no validation threshold (it did not finish training)")
            m = binary_metrics(self.labels[idx], self.probs[idx], self.threshold)
        else:
            m = multiclass_metrics(self.labels[idx], self.probs[idx], ordinal=task.ordered)
        m.pop("medmnist_acc", None)
        return m


def load_predictions(run_dir: str | Path, split: str = "test") -> RunPredictions:
    run = Run.open(run_dir, expect="classification")
    path = run.dir / "predictions.csv"
    if not path.is_file():
        raise MedlensError("no predictions.csv: evaluate the run first (medlens evaluate)", run.dir)
    df = pd.read_csv(path)
    df = cast(pd.DataFrame, df[df["split"] == split])   # a boolean mask selects rows: pandas' typing says less
    if df.empty:
        raise DataError(f"predictions.csv has no '{split}' rows", path)
    task = run.task_type
    if not task.exclusive:  # paired tests compare one decision per case
        raise MedlensError(f"compare handles binary, multi-class and ordinal runs, not {task.title}", run.dir)
    probs = task.read_probabilities(df, run.meta.class_names)
    return RunPredictions(run.name, task.name, list(run.meta.class_names),
                          run.meta.threshold.value if run.meta.threshold else None, df["source"].astype(str).to_numpy(),
                          df["label"].to_numpy(int), probs,
                          run.meta.calibration.method if run.meta.calibration else None)


def align(runs: list[RunPredictions]) -> list[RunPredictions]:
    """Order every run's cases like the first run's; refuse runs not evaluated on the same cases."""
    ref = runs[0]
    if len(set(ref.sources)) != len(ref.sources):
        raise DataError("the evaluated cases have repeated sources; cases cannot be paired", ref.name)
    order = {s: i for i, s in enumerate(ref.sources)}
    out = [ref]
    for r in runs[1:]:
        if not get_task(ref.task).same_outputs(ref.class_names, r.task, r.class_names):
            raise MedlensError(f"runs differ in task or classes ({ref.name}: {ref.task} {ref.class_names}; "
                               f"{r.name}: {r.task} {r.class_names})", r.name)
        if set(r.sources) != set(order) or len(r.sources) != len(ref.sources):
            only = len(set(r.sources) ^ set(order))
            raise MedlensError(f"not evaluated on the same cases as {ref.name} ({only} case(s) differ); a paired "
                               "comparison needs the same test cases", r.name)
        idx = np.argsort([order[s] for s in r.sources])
        r = RunPredictions(r.name, r.task, r.class_names, r.threshold, r.sources[idx], r.labels[idx], r.probs[idx],
                           r.calibration)
        if not np.array_equal(r.labels, ref.labels):
            raise MedlensError(f"the same cases carry different labels than in {ref.name}", r.name)
        out.append(r)
    return out


def compare_runs(run_dirs: list[str | Path], n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Pairwise comparison of each run against the first (the reference) on the same test cases."""
    if len(run_dirs) < 2:
        raise MedlensError("compare needs at least two runs")
    runs = align([load_predictions(d) for d in run_dirs])
    ref, y = runs[0], runs[0].labels
    out = {"n": int(len(y)), "ci_level": ci, "n_bootstrap": n_boot, "task": ref.task,
           "runs": [{"name": r.name, "threshold": r.threshold, "calibration": r.calibration,
                     "metrics": r.metrics(np.arange(len(y)))} for r in runs], "pairs": []}
    for r in runs[1:]:
        pair: dict = {"a": ref.name, "b": r.name}
        if get_task(ref.task).one_score(len(ref.class_names)):  # DeLong compares two AUCs of one score
            pair["delong"] = delong_test(y, ref.probs, r.probs, ci)
        pair["mcnemar"] = mcnemar_test(ref.correct(), r.correct())
        def fn(idx, a=ref, b=r):
            mb = b.metrics(idx)
            return {k: v - mb[k] for k, v in a.metrics(idx).items()}

        point, cis = fn(np.arange(len(y))), bootstrap_ci(fn, len(y), n_boot, ci, seed)
        pair["differences"] = {k: {"value": v, "ci_low": cis.get(k, (np.nan, np.nan))[0],
                                   "ci_high": cis.get(k, (np.nan, np.nan))[1]} for k, v in point.items()}
        out["pairs"].append(pair)
    out["_runs"] = runs  # for the plots; dropped before writing JSON
    return out
