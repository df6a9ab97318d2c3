"""Clinical classification metrics with 95% bootstrap confidence intervals.

Binary metrics are computed at a threshold chosen on validation. Every task also reports the
MedMNIST evaluator's numbers (AUC; ACC at 0.5 / argmax) so results compare with the paper.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from medlens.tasks import Task, get_task


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, raw: np.ndarray | None = None) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, PPV, NPV, F1 and balanced accuracy at ``threshold``; the
    MedMNIST ACC thresholds the model's uncalibrated output ``raw`` (default ``p``) at 0.5, as the paper does."""
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, float).ravel()
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv = _div(tp, tp + fp), _div(tn, tn + fn)
    return {
        "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
        "accuracy": _div(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
        "medmnist_acc": float(((np.asarray(p if raw is None else raw, float).ravel() >= 0.5).astype(int) == y).mean()),
    }


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, ordinal: bool = False) -> dict[str, float]:
    """Macro one-vs-rest AUC, argmax accuracy, balanced accuracy, macro F1; QWK and MAE for ordinal."""
    y = np.asarray(y).astype(int).ravel()
    prob = np.asarray(prob, float)
    k = prob.shape[1]
    pred = prob.argmax(1)
    present = np.unique(y)
    if len(present) == k:
        auc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(k)))
    else:  # a bootstrap resample may miss a class: average the per-class AUCs that are defined
        aucs = [roc_auc_score((y == c).astype(int), prob[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    recalls = [_div(((pred == c) & (y == c)).sum(), (y == c).sum()) for c in present]
    f1s = []
    for c in range(k):
        tp = ((pred == c) & (y == c)).sum()
        denom = (pred == c).sum() + (y == c).sum()
        if denom:
            f1s.append(2 * tp / denom)
    out = {"auc": auc, "accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.nanmean(recalls)),
           "macro_f1": float(np.mean(f1s)), "medmnist_acc": float((pred == y).mean())}
    if ordinal:
        out["qwk"] = float(cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(k)))
        out["mae"] = float(np.abs(pred - y).mean())
    return out


def multilabel_metrics(y: np.ndarray, prob: np.ndarray, thresholds: np.ndarray | None = None,
                       names: list[str] | None = None) -> dict[str, float]:
    """Mean per-label AUC and mean per-label accuracy at 0.5 (the MedMNIST evaluator's definition).

    With ``thresholds`` (one per label, chosen on validation; issue 26) also each label's AUC, sensitivity,
    specificity and F1 at its threshold (keys ``"<label>: auc"``...; ``names`` default ``label_<j>``) and their
    macro means (``macro_sensitivity``, ``macro_specificity``, ``macro_f1``)."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    aucs = [roc_auc_score(y[:, j], prob[:, j]) if 0 < y[:, j].sum() < len(y) else float("nan")
            for j in range(y.shape[1])]
    defined = [a for a in aucs if np.isfinite(a)]
    acc = float(((prob >= 0.5).astype(int) == y).mean())
    out = {"auc": float(np.mean(defined)) if defined else float("nan"), "accuracy": acc, "medmnist_acc": acc}
    if thresholds is None:
        return out
    names = names or [f"label_{j}" for j in range(y.shape[1])]
    per: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "f1": []}
    for j, name in enumerate(names):
        m = binary_metrics(y[:, j], prob[:, j], float(thresholds[j]))
        out[f"{name}: auc"] = aucs[j]
        for k in per:
            out[f"{name}: {k}"] = m[k]
            per[k].append(m[k])
    for k, v in per.items():
        out[f"macro_{k}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Mean absolute error, root mean squared error and R² (1 - SSE / SST; NaN when the targets do not vary)."""
    y, pred = np.asarray(y, float).reshape(-1), np.asarray(pred, float).reshape(-1)
    err = pred - y
    sst = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": 1.0 - float((err ** 2).sum()) / sst if sst > 0 else float("nan")}


def bootstrap_ci(fn: Callable[[np.ndarray], dict[str, float]], n: int, n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap: ``fn(idx)`` computes the metrics on resampled indices ``idx``."""
    if n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in fn(idx).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    out = {}
    for k, vals in draws.items():
        a = np.asarray(vals, float)
        a = a[np.isfinite(a)]
        out[k] = (float(np.percentile(a, lo)), float(np.percentile(a, hi))) if len(a) else (float("nan"),) * 2
    return out


def compute_metrics(task: str | Task, y: np.ndarray, prob: np.ndarray,
                    threshold: float | dict[str, float] | None = None,
                    n_boot: int = 1000, ci: float = 0.95, seed: int = 0, raw: np.ndarray | None = None) -> dict:
    """Point estimates, CIs and the confusion matrix for one split.

    ``prob`` is (N,) positive-class probabilities for binary tasks, (N, K) otherwise; ``raw``, the
    uncalibrated output when ``prob`` is calibrated, feeds only the MedMNIST-evaluator ACC.
    Returns ``{"metrics": {name: {"value", "ci_low", "ci_high"}}, "confusion_matrix": [[...]], ...}``.
    """
    y = np.asarray(y)
    prob = np.asarray(prob, float)
    task = get_task(task)
    family = METRIC_FAMILIES.get(task.metrics)
    if family is None:
        raise ValueError(f"no case metrics for a {task.name} task (metrics family {task.metrics!r})")
    # binary: one threshold; multi-label: one per label (``{label: threshold}``, issue 26), else none
    thr: float | dict[str, float] | None = None
    if task.has_threshold:
        thr = 0.5 if threshold is None or isinstance(threshold, dict) else float(threshold)
    elif task.label_thresholds:
        thr = threshold
    fn, cm = family(task, y, prob, thr, raw)
    point = fn(np.arange(len(y)))
    cis = bootstrap_ci(fn, len(y), n_boot, ci, seed)
    metrics = {k: {"value": v, "ci_low": cis.get(k, (float("nan"),) * 2)[0],
                   "ci_high": cis.get(k, (float("nan"),) * 2)[1]} for k, v in point.items()}
    out = {"n": int(len(y)), "metrics": metrics, "ci_level": ci, "n_bootstrap": n_boot}
    if cm is not None:
        out["confusion_matrix"] = cm.tolist()
    if task.has_threshold:
        out["threshold"] = thr
    elif isinstance(thr, dict):
        out["label_thresholds"] = dict(thr)
    return out


# The metric families a task names (``Task.metrics``): f(task, y, prob, threshold, raw) -> (the metrics of
# the cases ``idx``, the confusion matrix or None). A task whose metrics are not these adds its family here.
def _binary_family(task: Task, y, prob, thr, raw):
    fn = lambda idx: binary_metrics(y[idx], prob[idx], thr, None if raw is None else raw[idx])  # noqa: E731
    return fn, confusion_matrix(y.astype(int), task.hard_predictions(prob, thr), labels=[0, 1])


def _multiclass_family(task: Task, y, prob, thr, raw):
    fn = lambda idx: multiclass_metrics(y[idx], prob[idx], ordinal=task.ordered)  # noqa: E731
    return fn, confusion_matrix(y.astype(int), task.hard_predictions(prob), labels=np.arange(prob.shape[1]))


def _multilabel_family(task: Task, y, prob, thr, raw):
    """``thr``: None, one threshold for every label, or ``{label: threshold}`` (the run's, from validation)."""
    names = list(thr) if isinstance(thr, dict) else None
    t = None if thr is None else np.broadcast_to(np.asarray(list(thr.values()) if isinstance(thr, dict) else thr,
                                                            float), (prob.shape[1],))
    return (lambda idx: multilabel_metrics(y[idx], prob[idx], t, names)), None


def _regression_family(task: Task, y, prob, thr, raw):
    return (lambda idx: regression_metrics(y[idx], prob[idx])), None


MetricFamily = Callable[[Task, np.ndarray, np.ndarray, "float | dict[str, float] | None", "np.ndarray | None"],
                        "tuple[Callable[[np.ndarray], dict[str, float]], np.ndarray | None]"]
METRIC_FAMILIES: dict[str | None, MetricFamily] = {
    "binary": _binary_family, "multiclass": _multiclass_family, "multilabel": _multilabel_family,
    "regression": _regression_family}
