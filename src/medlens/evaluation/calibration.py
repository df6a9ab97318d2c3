"""Probability calibration: ECE/MCE and Brier score with bootstrap CIs, and scaling fitted on validation.

ECE and MCE follow torchmetrics' ``CalibrationError`` (equal-width bins over [0, 1]; binary tasks bin the
positive-class probability against the label, multi-class tasks bin the top probability against
whether the top class is right); a test checks the two agree. The NumPy form here is what the
bootstrap resamples a thousand times.

Scaling is fitted on the validation split only and stored in the run (``RunMeta.calibration``):
Platt scaling for binary runs (a logistic regression on the logit), temperature scaling for
multi-class and ordinal runs (one temperature minimising the validation negative log-likelihood).
Both are monotone, so AUC and the argmax do not change; the probabilities do.

``auto`` does not assume scaling helps (issue 26): ``select_calibration`` scores none and every scaling that fits
the task (binary: Platt, temperature, isotonic; multi-class/ordinal: temperature) by stratified k-fold
cross-validation inside the validation split (fit on k-1 folds, log-loss on the held-out fold) and keeps
``none`` unless a scaling lowers the held-out log-loss by at least ``MIN_GAIN``; ``RunMeta.calibration_choice``
records every candidate's log-loss and the improvement.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from medlens.evaluation.metrics import bootstrap_ci
from medlens.run.meta import MAX_KNOTS, Calibration
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


MIN_GAIN = 1e-3   # nats of held-out log-loss a scaling must save over none to be kept


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of labels ``y`` under probabilities ``p`` ((N,) binary or (N, K))."""
    p, y = np.asarray(p, np.float64), np.asarray(y).astype(int)
    if p.ndim == 1:
        q = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


def _fit(method: str, y: np.ndarray, p: np.ndarray) -> Calibration | None:
    """One scaling fitted on (y, p); None when the fit would reverse the ranking."""
    n = len(y)
    if method == "platt":
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(_logit(p).reshape(-1, 1), y.astype(int))
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        return Calibration(method="platt", params={"a": a, "b": b}, n=n) if a > 0 else None
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y.astype(float))
        xs, ys = np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64)
        if len(xs) > MAX_KNOTS:   # keep the knot count bounded: the fitted curve read at evenly spaced quantiles
            xs = np.unique(np.quantile(xs, np.linspace(0, 1, MAX_KNOTS)))
            ys = np.maximum.accumulate(np.interp(xs, iso.X_thresholds_, iso.y_thresholds_))
        if len(xs) < 2:           # a constant fit carries no ranking at all
            return None
        return Calibration(method="isotonic", params={}, knots=[xs.tolist(), np.clip(ys, 0, 1).tolist()], n=n)
    y = y.astype(int)
    if p.ndim == 1:   # binary temperature: one score's logit divided by t
        z = _logit(p)
        nll = lambda log_t: log_loss(y, 1.0 / (1.0 + np.exp(-z / np.exp(log_t))))  # noqa: E731
    else:
        logp = np.log(np.clip(p, 1e-12, 1.0))

        def nll(log_t: float) -> float:
            zz = logp / np.exp(log_t)
            zz = zz - zz.max(1, keepdims=True)
            return float(-(zz[np.arange(len(y)), y] - np.log(np.exp(zz).sum(1))).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibration(method="temperature", params={"t": float(np.exp(res.x))}, n=n)


def calibration_candidates(task: str | Task, n_classes: int) -> list[str]:
    """The scalings ``auto`` chooses among (besides none): the task's own, plus temperature and isotonic for a
    task with one score per case."""
    t = get_task(task)
    extra = ["temperature", "isotonic"] if t.calibrations and t.one_score(n_classes) else []
    return list(dict.fromkeys([*t.calibrations, *extra]))


def select_calibration(task: str, y_val: np.ndarray, p_val: np.ndarray, setting: str = "auto", folds: int = 5,
                       seed: int = 0) -> tuple[Calibration | None, dict | None]:
    """The calibration a run carries and the evidence for it (``RunMeta.calibration_choice``).

    ``auto``: none, or the candidate with the lowest held-out log-loss by stratified ``folds``-fold
    cross-validation inside the validation split, when it beats none by at least ``MIN_GAIN``; the chosen
    method is then refitted on the whole validation split. A named method is fitted as asked (its
    cross-validated log-loss is still recorded). Evidence is None when the task has no calibration.
    """
    y_val, p_val = np.asarray(y_val), np.asarray(p_val, np.float64)
    n_classes = p_val.shape[1] if p_val.ndim == 2 else 2
    method = calibration_method(task, setting)   # refuses a setting that does not fit the task
    if setting != "auto" and method is None:
        return None, ({"setting": setting, "chosen": "none"} if get_task(task).calibrations else None)
    cands = calibration_candidates(task, n_classes) if setting == "auto" else [method] if method else []
    if not cands:
        return None, None
    counts = np.bincount(y_val.astype(int), minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min())) if (counts > 0).sum() >= 2 else 0
    evidence: dict = {"setting": setting, "folds": k, "n": int(len(y_val)), "min_gain": MIN_GAIN}
    if (counts > 0).sum() < 2:
        evidence.update(chosen="none", reason="the validation split holds a single class")
        return None, evidence
    if k < 2:
        evidence.update(chosen="none", reason="too few validation cases of a class to cross-validate")
        if setting == "auto":
            return None, evidence
        cal = _fit(cands[0], y_val, p_val)
        evidence["chosen"] = cal.method if cal else "none"
        return cal, evidence
    losses: dict[str, list[float]] = {m: [] for m in ["none", *cands]}
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(p_val, y_val):
        losses["none"].append(log_loss(y_val[te], p_val[te]))
        for m in cands:
            cal = _fit(m, y_val[tr], p_val[tr]) if len(np.unique(y_val[tr])) > 1 else None
            losses[m].append(log_loss(y_val[te], cal.apply(p_val[te]) if cal else p_val[te]))
    mean = {m: float(np.mean(v)) for m, v in losses.items()}
    evidence["held_out_log_loss"] = mean
    best = min(cands, key=lambda m: mean[m])
    gain = mean["none"] - mean[best]
    if setting == "auto" and gain < MIN_GAIN:
        evidence.update(chosen="none", improvement=0.0,
                        reason=f"no scaling lowered the held-out log-loss by {MIN_GAIN:g} or more "
                               f"(best: {best}, {gain:+.4f})")
        return None, evidence
    cal = _fit(best, y_val, p_val)
    evidence.update(chosen=cal.method if cal else "none", improvement=float(gain) if cal else 0.0)
    return cal, evidence


def fit_calibration(task: str, y_val: np.ndarray, p_val: np.ndarray, setting: str = "auto") -> Calibration | None:
    """The calibration of ``select_calibration`` without its evidence."""
    y_val = np.asarray(y_val)
    if len(np.unique(y_val)) < 2:
        calibration_method(task, setting)
        return None
    return select_calibration(task, y_val, p_val, setting)[0]
