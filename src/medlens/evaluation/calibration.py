"""Probability calibration: ECE/MCE and Brier score with bootstrap CIs, and scaling fitted on validation.

ECE and MCE follow torchmetrics' ``CalibrationError`` (equal-width bins over [0, 1]; binary tasks bin the
positive-class probability against the label, multi-class tasks bin the top probability against
whether the top class is right); a test checks the two agree. The NumPy form here is what the
bootstrap resamples a thousand times.

Scaling is fitted on the validation split only and stored in the run (``RunMeta.calibration``):
Platt scaling for binary runs (a logistic regression on the logit), temperature scaling for
multi-class and ordinal runs (one temperature minimising the validation negative log-likelihood).
Both are monotone, so AUC and the argmax do not change; the probabilities do.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression

from medlens.evaluation.metrics import bootstrap_ci
from medlens.run.meta import Calibration
from medlens.tasks import Task, get_task


def _binned(y: np.ndarray, p: np.ndarray, n_bins: int):
    """Per non-empty equal-width bin: (count, mean confidence, mean accuracy). Binary tasks bin the
    positive-class probability against the label; multi-class the top probability against correctness."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y)
    if p.ndim == 1:
        conf, acc = p, y.astype(np.float64)
    else:
        conf, acc = p.max(1), (p.argmax(1) == y.astype(int)).astype(np.float64)
    bounds = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(bounds, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    seen = count > 0
    return (count[seen], np.bincount(idx, conf, n_bins)[seen] / count[seen],
            np.bincount(idx, acc, n_bins)[seen] / count[seen])


def calibration_errors(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """``{"ece", "mce", "brier"}`` of probabilities ``p`` ((N,) binary or (N, K)) against labels ``y``."""
    count, conf, acc = _binned(y, p, n_bins)
    gap = np.abs(acc - conf)
    p = np.asarray(p, np.float64)
    if p.ndim == 1:
        brier = float(np.mean((p - np.asarray(y, np.float64)) ** 2))
    else:
        onehot = np.eye(p.shape[1])[np.asarray(y, int)]
        brier = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    return {"ece": float(np.sum(gap * count) / count.sum()), "mce": float(gap.max()), "brier": brier}


def calibration_with_ci(y: np.ndarray, p: np.ndarray, n_bins: int = 15, n_boot: int = 1000, ci: float = 0.95,
                        seed: int = 0) -> dict[str, dict[str, float]]:
    """ECE, MCE and Brier score with percentile-bootstrap CIs over cases."""
    y, p = np.asarray(y), np.asarray(p)
    fn = lambda idx: calibration_errors(y[idx], p[idx], n_bins)  # noqa: E731
    point, cis = fn(np.arange(len(y))), bootstrap_ci(fn, len(y), n_boot, ci, seed)
    nan2 = (float("nan"), float("nan"))
    return {k: {"value": v, "ci_low": cis.get(k, nan2)[0], "ci_high": cis.get(k, nan2)[1]} for k, v in point.items()}


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed frequency/accuracy and count, for the reliability diagram."""
    count, conf, acc = _binned(y, p, n_bins)
    return {"confidence": conf.tolist(), "observed": acc.tolist(), "count": count.astype(int).tolist()}


def calibration_method(task: str | Task, setting: str) -> str | None:
    """The scaling a run gets (the task's ``calibrations``): ``auto`` is Platt for binary and temperature for
    multi-class/ordinal; none for multi-label and segmentation."""
    return get_task(task).calibration_method(setting)


def fit_calibration(task: str, y_val: np.ndarray, p_val: np.ndarray, setting: str = "auto") -> Calibration | None:
    """Fit Platt or temperature scaling on validation probabilities; None when the setting or task has none.

    A Platt fit whose slope is not positive would reverse the ranking (a model no better than chance on
    validation); it is refused and the run keeps its raw probabilities.
    """
    method = calibration_method(task, setting)
    y_val, p_val = np.asarray(y_val), np.asarray(p_val, np.float64)
    if method is None or len(np.unique(y_val)) < 2:
        return None
    if method == "platt":
        q = np.clip(p_val, 1e-7, 1 - 1e-7)
        z = np.log(q / (1 - q)).reshape(-1, 1)
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z, y_val.astype(int))
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if not a > 0:
            return None
        return Calibration(method="platt", params={"a": a, "b": b}, n=len(y_val))
    logp = np.log(np.clip(p_val, 1e-12, 1.0))
    y = y_val.astype(int)

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibration(method="temperature", params={"t": float(np.exp(res.x))}, n=len(y_val))
