"""Prediction intervals of regression runs (issue 26): split-conformal, fitted on the validation residuals only.

With ``n`` absolute validation residuals ``|y - f(x)|``, the ``ceil((n + 1) c) / n`` empirical quantile ``q``
makes ``[f(x) - q, f(x) + q]`` cover the true value of a new exchangeable case with probability at least ``c``
(Lei, G'Sell, Rinaldo, Tibshirani and Wasserman, JASA 2018). Too few cases for that quantile give the largest
residual (the interval is then wider than ``c`` asks)."""

from __future__ import annotations

import math

import numpy as np

from medlens.errors import MedlensError
from medlens.run import PredictionInterval


def conformal_interval(y_val: np.ndarray, pred_val: np.ndarray, coverage: float) -> PredictionInterval:
    """The split-conformal half-width at ``coverage`` from validation targets and predictions."""
    res = np.abs(np.asarray(y_val, float).reshape(-1) - np.asarray(pred_val, float).reshape(-1))
    n = len(res)
    if n == 0 or not np.isfinite(res).all():
        raise MedlensError(f"no prediction interval: {n} validation residual(s), finite: {bool(np.isfinite(res).all())}")
    k = min(n, math.ceil((n + 1) * coverage))   # the k-th smallest residual
    return PredictionInterval(coverage=coverage, half_width=float(np.sort(res)[k - 1]), n=n)


def interval_coverage(y: np.ndarray, pred: np.ndarray, half_width: float) -> float:
    """The share of cases whose true value lies inside ``pred +- half_width``."""
    y, pred = np.asarray(y, float).reshape(-1), np.asarray(pred, float).reshape(-1)
    return float(np.mean(np.abs(y - pred) <= half_width)) if len(y) else float("nan")
