"""Operating points, for every task: a decision threshold chosen on validation predictions, never on test.

Binary classifiers: a rule on the validation ROC (``choose_threshold``); two-class segmenters: the best
mean validation Dice (``choose_dice_threshold``). The chosen value is stored once, in ``RunMeta.threshold``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from medlens.config import parse_threshold_rule
from medlens.evaluation.segmetrics import dice


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, rule: str = "youden") -> float:
    """Pick the threshold on the validation labels and scores by ``rule``.

    This function only ever sees validation data; evaluation applies its result to test.
    """
    name, arg = parse_threshold_rule(rule)
    if name == "fixed":
        assert arg is not None  # parse_threshold_rule gives a fixed rule its number
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


def choose_dice_threshold(prob_fg: list[np.ndarray], refs: list[np.ndarray], grid=None) -> tuple[float, float]:
    """Segmentation: the foreground threshold with the best mean Dice over the validation cases (never
    test); returns (threshold, mean validation Dice at it)."""
    grid = np.round(np.arange(0.1, 0.91, 0.05), 2) if grid is None else grid
    best = (0.5, -1.0)
    for t in grid:
        d = float(np.mean([dice(p >= t, r) for p, r in zip(prob_fg, refs)]))
        if d > best[1] + 1e-9:
            best = (float(t), d)
    return best


def choose_label_thresholds(y_val: np.ndarray, p_val: np.ndarray, names: list[str],
                            rule: str = "youden") -> dict[str, float]:
    """Multi-label: one threshold per label, each by ``rule`` on that label's validation column (never test)."""
    y, p = np.asarray(y_val), np.asarray(p_val, float)
    return {name: choose_threshold(y[:, j], p[:, j], rule) for j, name in enumerate(names)}
