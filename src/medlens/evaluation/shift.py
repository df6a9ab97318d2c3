"""Validation-to-test shift: does what was chosen on validation hold on the test split?

Validation is usually drawn from the training distribution and the test split (or a new site) is not.
This compares the two: class prevalence, the score distributions (two-sample Kolmogorov-Smirnov, per
true class so that a prevalence change alone does not count as a score shift), and the operating point
(sensitivity and specificity at the validation-chosen threshold). A drop larger than
``evaluation.shift_tolerance`` is flagged in plain words.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from medlens.evaluation.metrics import binary_metrics
from medlens.tasks import Task, get_task


def _ks(a: np.ndarray, b: np.ndarray) -> dict[str, float] | None:
    if len(a) < 2 or len(b) < 2:
        return None
    r = stats.ks_2samp(a, b)
    # scipy's axis/NaN-policy decorator hides KstestResult from type checkers: hence the ignore
    statistic, p_value = r.statistic, r.pvalue  # pyright: ignore[reportAttributeAccessIssue]
    return {"statistic": float(statistic), "p_value": float(p_value), "n_val": int(len(a)), "n_test": int(len(b))}


def shift_report(task: str | Task, class_names: list[str], y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray,
                 p_test: np.ndarray, threshold: float | None, tolerance: float = 0.05,
                 test_name: str = "test", chosen_on: str = "val") -> dict:
    """Prevalence, per-class score tests, operating-point drift and plain-language flags. ``chosen_on``: where
    the threshold was chosen (``Threshold.chosen_on``: val, or site for a recalibrated run), as the flag says."""
    y_val, y_test = np.asarray(y_val).astype(int), np.asarray(y_test).astype(int)
    p_val, p_test = np.asarray(p_val, float), np.asarray(p_test, float)
    k = len(class_names)
    out: dict = {"prevalence": {"val": np.bincount(y_val, minlength=k).astype(float) / max(len(y_val), 1),
                                test_name: np.bincount(y_test, minlength=k).astype(float) / max(len(y_test), 1)},
                 "score_tests": {}, "operating_point": {}, "flags": []}
    out["prevalence"] = {s: v.tolist() for s, v in out["prevalence"].items()}
    task = get_task(task)
    score_v, score_t = task.confidence(p_val), task.confidence(p_test)
    what = task.confidence_name(class_names)
    for c, name in enumerate(class_names):
        t = _ks(score_v[y_val == c], score_t[y_test == c])
        if t:
            out["score_tests"][name] = t | {"score": what}
            if t["p_value"] < 0.01 and t["statistic"] > 0.1:
                out["flags"].append(f"the scores of true '{name}' cases differ between validation and {test_name} "
                                    f"(Kolmogorov-Smirnov D = {t['statistic']:.3f}, p = {t['p_value']:.2g})")
    pv, pt = out["prevalence"]["val"], out["prevalence"][test_name]
    for c, name in enumerate(class_names):
        if abs(pv[c] - pt[c]) > 0.1:
            out["flags"].append(f"the share of '{name}' changes from {pv[c]:.3f} on validation to {pt[c]:.3f} on "
                                f"{test_name}")
    if task.has_threshold and threshold is not None:
        mv, mt = binary_metrics(y_val, p_val, threshold), binary_metrics(y_test, p_test, threshold)
        for m in ("sensitivity", "specificity", "ppv", "npv"):
            out["operating_point"][m] = {"val": mv[m], test_name: mt[m], "change": mt[m] - mv[m]}
        drops = [f"{m} {mv[m]:.3f} -> {mt[m]:.3f}" for m in ("sensitivity", "specificity")
                 if mv[m] - mt[m] > tolerance]
        if drops:
            what = ("the threshold chosen on validation did not transfer" if chosen_on == "val" else
                    f"the threshold chosen on the site sample does not hold from validation to {test_name}")
            out["flags"].insert(0, f"{what}: " + ", ".join(drops))
    else:
        av = float((p_val.argmax(1) == y_val).mean())
        at = float((p_test.argmax(1) == y_test).mean())
        out["operating_point"]["accuracy"] = {"val": av, test_name: at, "change": at - av}
        if av - at > tolerance:
            out["flags"].insert(0, f"accuracy dropped from validation to {test_name}: {av:.3f} -> {at:.3f}")
    out["transferred"] = not any(f.startswith(("the threshold", "accuracy dropped")) for f in out["flags"])
    return out
