"""Calibration, DeLong/McNemar, decision curves, shift and subgroups against independent computations."""


import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from medlens.errors import DataError, MedlensWarning
from medlens.evaluation.calibration import calibration_errors, fit_calibration
from medlens.evaluation.compare import delong_test, mcnemar_test
from medlens.evaluation.decision import decision_curve
from medlens.evaluation.shift import shift_report
from medlens.evaluation.subgroups import subgroup_metrics


def _cases(n=300, seed=0, sep=1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    z = rng.normal(size=n) + sep * y
    return y, 1 / (1 + np.exp(-z)), rng


# ---------- calibration ----------
@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_mce_match_torchmetrics_binary_and_multiclass(n_bins):
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    y, p, rng = _cases()
    ours = calibration_errors(y, p, n_bins)
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = float(binary_calibration_error(torch.tensor(p), torch.tensor(y), n_bins=n_bins, norm=norm))
        assert ours[key] == pytest.approx(ref, abs=1e-6)
    logits = rng.normal(size=(300, 4)) * 2
    pk = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    yk = rng.integers(0, 4, 300)
    ours = calibration_errors(yk, pk, n_bins)
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = float(multiclass_calibration_error(torch.tensor(pk), torch.tensor(yk), num_classes=4, n_bins=n_bins,
                                                 norm=norm))
        assert ours[key] == pytest.approx(ref, abs=1e-6)
    # Brier: mean squared distance to the one-hot label, by hand
    assert ours["brier"] == pytest.approx(np.mean([((pk[i] - np.eye(4)[yk[i]]) ** 2).sum() for i in range(300)]))


def test_platt_scaling_fixes_overconfidence_and_keeps_the_ranking():
    rng = np.random.default_rng(1)
    y = (rng.random(4000) < 0.3).astype(int)
    true_logit = rng.normal(size=4000) + 2.0 * y - 1.0
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)  # labels drawn from the true probability
    overconfident = 1 / (1 + np.exp(-3.0 * true_logit))                    # the model's logits are 3x too large
    val, test = slice(0, 2000), slice(2000, None)
    cal = fit_calibration("binary", y[val], overconfident[val], "platt")   # named: auto may choose another
    assert cal.method == "platt" and cal.fitted_on == "val"
    assert cal.params["a"] == pytest.approx(1 / 3, abs=0.08)  # recovers the 3x over-scaling
    after = cal.apply(overconfident[test])
    assert calibration_errors(y[test], after)["ece"] < 0.5 * calibration_errors(y[test], overconfident[test])["ece"]
    assert roc_auc_score(y[test], after) == pytest.approx(roc_auc_score(y[test], overconfident[test]), abs=1e-9)


def test_temperature_scaling_keeps_argmax_and_lowers_nll():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3000, 3)) * 1.5
    y = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    hot = np.exp(4 * logits) / np.exp(4 * logits).sum(1, keepdims=True)  # temperature 1/4: overconfident
    cal = fit_calibration("multiclass", y[:1500], hot[:1500], "auto")
    assert cal.method == "temperature" and cal.params["t"] == pytest.approx(4.0, rel=0.2)
    after = cal.apply(hot[1500:])
    assert (after.argmax(1) == hot[1500:].argmax(1)).all()
    nll = lambda p: -np.log(p[np.arange(1500), y[1500:]]).mean()  # noqa: E731
    assert nll(after) < nll(hot[1500:])


def test_calibration_setting_that_does_not_fit_the_task_is_refused():
    from medlens.errors import ConfigError

    y, p, _ = _cases()
    with pytest.raises(ConfigError, match="platt: binary"):
        fit_calibration("multiclass", y, np.stack([1 - p, p], 1), "platt")
    assert fit_calibration("binary", y, p, "none") is None


# ---------- DeLong and McNemar ----------
def _delong_by_hand(y, a, b):
    """DeLong et al. (1988) built from every positive-negative pair (Mann-Whitney kernel), no ranks."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        psi = np.array([[1.0 if x > z else 0.5 if x == z else 0.0 for z in s[neg]] for x in s[pos]])
        comps.append((psi.mean(1), psi.mean(0), psi.mean()))
    m, n = pos.sum(), neg.sum()
    v10 = np.vstack([c[0] for c in comps])
    v01 = np.vstack([c[1] for c in comps])
    s = np.cov(v10) / m + np.cov(v01) / n
    diff = comps[0][2] - comps[1][2]
    se = np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return comps[0][2], comps[1][2], diff, se, 2 * stats.norm.sf(abs(diff / se))


def test_delong_equals_the_exhaustive_pairwise_construction_with_ties():
    rng = np.random.default_rng(3)
    y = (rng.random(80) < 0.45).astype(int)
    a = np.round(rng.random(80) + 0.5 * y, 1)            # rounded: many ties
    b = np.round(0.7 * a + rng.random(80) * 0.5, 1)       # correlated with a
    got = delong_test(y, a, b)
    auc_a, auc_b, diff, se, p = _delong_by_hand(y, a, b)
    assert got["auc_a"] == pytest.approx(auc_a, abs=1e-12) and got["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert got["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert got["difference"] == pytest.approx(diff, abs=1e-12)
    assert got["se"] == pytest.approx(se, abs=1e-12)
    assert got["p_value"] == pytest.approx(p, abs=1e-9)
    assert got["ci_low"] == pytest.approx(diff - 1.959963984540054 * se, abs=1e-9)


def test_delong_needs_both_classes():
    with pytest.raises(DataError, match="both classes"):
        delong_test(np.ones(5), np.arange(5.0), np.arange(5.0))


def test_mcnemar_exact_counts_and_p_value():
    a = np.array([1] * 10 + [0] * 2 + [1] * 20 + [0] * 5, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 20 + [0] * 5, bool)
    got = mcnemar_test(a, b)
    assert (got["a_right_b_wrong"], got["a_wrong_b_right"]) == (10, 2)
    # exact two-sided binomial: 2 * P(X <= 2), X ~ Bin(12, 1/2)
    by_hand = 2 * sum(stats.binom.pmf(k, 12, 0.5) for k in range(3))
    assert got["p_value"] == pytest.approx(by_hand, abs=1e-12)
    assert mcnemar_test(a, a)["p_value"] == 1.0


# ---------- decision curve ----------
def test_net_benefit_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    p = np.array([.9, .6, .2, .7, .3, .1, .1, .05, .05, .02])
    d = decision_curve(y, p, 0.1, 0.5, 0.1)
    assert d["thresholds"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # pt = 0.2: treated p >= 0.2 -> TP 3 (.9 .6 .2), FP 2 (.7 .3); NB = 3/10 - 2/10 * 0.25
    assert d["model"][1] == pytest.approx(0.3 - 0.2 * 0.25)
    # pt = 0.5: TP 2, FP 1; NB = 0.2 - 0.1 * 1
    assert d["model"][4] == pytest.approx(0.1)
    assert d["treat_all"][1] == pytest.approx(0.3 - 0.7 * 0.25)
    assert d["prevalence"] == pytest.approx(0.3)


# ---------- shift ----------
def test_threshold_drift_is_flagged_in_plain_words():
    rng = np.random.default_rng(4)
    y_val = (rng.random(400) < 0.5).astype(int)
    p_val = np.where(y_val == 1, rng.uniform(0.5, 1, 400), rng.uniform(0, 0.45, 400))
    y_test = (rng.random(400) < 0.5).astype(int)
    # on test the negatives score higher: at the same threshold specificity falls
    p_test = np.where(y_test == 1, rng.uniform(0.5, 1, 400), rng.uniform(0.2, 0.8, 400))
    out = shift_report("binary", ["normal", "disease"], y_val, p_val, y_test, p_test, 0.47)
    spec_val = ((p_val < 0.47) & (y_val == 0)).sum() / (y_val == 0).sum()
    spec_test = ((p_test < 0.47) & (y_test == 0)).sum() / (y_test == 0).sum()
    assert out["flags"][0] == (f"the threshold chosen on validation did not transfer: specificity "
                               f"{spec_val:.3f} -> {spec_test:.3f}")
    assert not out["transferred"]
    assert out["score_tests"]["normal"]["p_value"] < 1e-6
    same = shift_report("binary", ["normal", "disease"], y_val, p_val, y_val, p_val, 0.47)
    assert same["flags"] == [] and same["transferred"]


# ---------- subgroups ----------
def test_subgroup_metrics_gaps_and_warnings():
    rng = np.random.default_rng(5)
    n = 200
    y = (rng.random(n) < 0.5).astype(int)
    site = np.where(np.arange(n) < 150, "A", "B")
    p = np.where(site == "A", 0.8 * y + 0.2 * rng.random(n), rng.random(n))  # perfect on A, chance on B
    site[-10:] = "C"
    y[-10:] = 1  # a small single-class group
    with pytest.warns(MedlensWarning, match="subgroup site=C"):
        out = subgroup_metrics("binary", y, p, 0.5, {"site": site}, n_boot=50, min_n=30)
    g = {r["value"]: r for r in out["site"]["groups"]}
    assert g["A"]["n"] == 150 and g["B"]["n"] == 40 and g["C"]["n"] == 10
    assert g["A"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(y[:150], p[:150]))
    assert g["A"]["metrics"]["auc"]["value"] == 1.0
    assert any("only 10 cases" in w for w in g["C"]["warnings"]) and any("single class" in w for w in g["C"]["warnings"])
    gap = out["site"]["gaps"]["auc"]
    assert gap["lowest"] == "B" and gap["highest"] == "A"
    assert gap["gap"] == pytest.approx(1.0 - roc_auc_score(y[150:190], p[150:190]))
