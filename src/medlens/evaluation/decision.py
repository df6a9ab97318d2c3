"""Decision-curve analysis (Vickers & Elkin, Medical Decision Making 26(6), 2006).

At a threshold probability ``pt`` a clinician treats when the (calibrated) probability reaches ``pt``;
the net benefit counts true positives and charges false positives at the odds ``pt / (1 - pt)``:
``NB = TP/N - FP/N * pt/(1 - pt)``. "Treat all" has ``NB = prevalence - (1 - prevalence) * pt/(1 - pt)``;
"treat none" has 0. A model is useful at ``pt`` only where it beats both.
"""

from __future__ import annotations

import numpy as np


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The model's net benefit at each threshold probability."""
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, np.float64).ravel()
    n = len(y)
    treat = p[None, :] >= np.asarray(thresholds)[:, None]
    tp = (treat & (y[None, :] == 1)).sum(1)
    fp = (treat & (y[None, :] == 0)).sum(1)
    odds = thresholds / (1 - thresholds)
    return tp / n - fp / n * odds


def decision_curve(y: np.ndarray, p: np.ndarray, low: float = 0.01, high: float = 0.6, step: float = 0.01) -> dict:
    """Net benefit of the model, treat-all and treat-none over ``[low, high]``, and where the model helps."""
    t = np.round(np.arange(low, high + step / 2, step), 6)
    y = np.asarray(y).astype(int).ravel()
    prev = float(y.mean())
    model = net_benefit(y, p, t)
    treat_all = prev - (1 - prev) * t / (1 - t)
    useful = model > np.maximum(treat_all, 0.0) + 1e-12
    return {"thresholds": t.tolist(), "model": model.tolist(), "treat_all": treat_all.tolist(),
            "prevalence": prev, "useful_from": float(t[useful].min()) if useful.any() else None,
            "useful_to": float(t[useful].max()) if useful.any() else None,
            "useful_fraction": float(useful.mean())}
