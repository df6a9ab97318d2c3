"""Operating points: a decision threshold chosen on validation predictions, never on test."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from medlens.errors import ConfigError

RULES = ("youden", "f1", "sensitivity", "specificity", "fixed")


def parse_threshold_rule(rule: str) -> tuple[str, float | None]:
    """``"youden"``, ``"f1"``, ``"sensitivity:0.9"``, ``"specificity:0.95"`` or ``"fixed:0.5"``."""
    name, _, arg = str(rule).partition(":")
    name = name.strip().lower()
    if name not in RULES:
        raise ConfigError(f"unknown threshold rule '{rule}'; expected one of youden, f1, sensitivity:X, "
                          "specificity:X, fixed:X")
    if name in ("sensitivity", "specificity", "fixed"):
        try:
            val = float(arg)
        except ValueError:
            raise ConfigError(f"threshold rule '{rule}' needs a number, e.g. {name}:0.9") from None
        if not 0.0 <= val <= 1.0:
            raise ConfigError(f"threshold rule '{rule}': {val} is outside [0, 1]")
        return name, val
    return name, None


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: str = "youden") -> float:
    """Pick the threshold on the validation labels and scores by ``rule``.

    This function only ever sees validation data; evaluation applies its result to test.
    """
    name, arg = parse_threshold_rule(rule)
    if name == "fixed":
        return float(arg)
    y = np.asarray(y_val).astype(int).ravel()
    p = np.asarray(p_val, float).ravel()
    if len(np.unique(y)) < 2:
        return 0.5  # no ROC without both classes; fall back to the neutral point
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)  # sklearn puts +inf first
    if name == "youden":
        i = int(np.argmax(tpr - fpr))
    elif name == "sensitivity":
        ok = np.flatnonzero(tpr >= arg)
        i = int(ok[0])  # highest threshold reaching the sensitivity (best specificity)
    elif name == "specificity":
        ok = np.flatnonzero(1.0 - fpr >= arg)
        i = int(ok[-1])  # lowest threshold keeping the specificity (best sensitivity)
    else:  # f1
        pos = y.sum()
        tp = tpr * pos
        fp = fpr * (len(y) - pos)
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (pos - tp)), 0.0)
        i = int(np.argmax(f1))
    return float(thr[i])
