import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from medlens.evaluation.metrics import binary_metrics, bootstrap_ci, compute_metrics, multiclass_metrics, \
    multilabel_metrics
from medlens.evaluation.threshold import choose_threshold, parse_threshold_rule
from medlens.errors import ConfigError


@pytest.fixture
def binary_case():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.35 + rng.normal(0.35, 0.22, 400), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(binary_case):
    y, p = binary_case
    thr = 0.42
    pred = (p >= thr).astype(int)
    m = binary_metrics(y, p, thr)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(1 - y, 1 - pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["medmnist_acc"] == pytest.approx(accuracy_score(y, (p >= 0.5).astype(int)))


def test_multiclass_and_ordinal_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + np.eye(5)[y] * 1.5
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, prob, ordinal=True)
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, prob.argmax(1)))
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, prob.argmax(1), weights="quadratic"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, prob.argmax(1), average="macro"))


def test_multilabel_matches_medmnist_definition():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 4))
    prob = np.clip(y * 0.4 + rng.uniform(0, 0.6, (200, 4)), 0, 1)
    m = multilabel_metrics(y, prob)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], prob[:, j]) for j in range(4)]))
    assert m["accuracy"] == pytest.approx(((prob >= 0.5) == y).mean())


def test_bootstrap_ci_brackets_point_and_shrinks_with_n(binary_case):
    y, p = binary_case
    small = compute_metrics("binary", y[:80], p[:80], 0.5, n_boot=300)["metrics"]["auc"]
    large = compute_metrics("binary", y, p, 0.5, n_boot=300)["metrics"]["auc"]
    for m in (small, large):
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"])


def test_bootstrap_is_seeded():
    fn = lambda idx: {"mean": float(np.arange(100)[idx].mean())}  # noqa: E731
    assert bootstrap_ci(fn, 100, 200, seed=5) == bootstrap_ci(fn, 100, 200, seed=5)
    assert bootstrap_ci(fn, 100, 200, seed=5) != bootstrap_ci(fn, 100, 200, seed=6)


def test_confusion_matrix_counts(binary_case):
    y, p = binary_case
    r = compute_metrics("binary", y, p, 0.5, n_boot=0)
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    assert tp == int(((p >= 0.5) & (y == 1)).sum()) and tn == int(((p < 0.5) & (y == 0)).sum())
    assert tn + fp + fn + tp == len(y)


def test_threshold_rules(binary_case):
    y, p = binary_case
    t_youden = choose_threshold(y, p, "youden")
    # Youden's J at the chosen threshold is the best over all candidate thresholds
    def j(t):
        m = binary_metrics(y, p, t)
        return m["sensitivity"] + m["specificity"] - 1
    assert j(t_youden) >= max(j(t) for t in np.unique(p)) - 1e-9
    t90 = choose_threshold(y, p, "sensitivity:0.9")
    assert binary_metrics(y, p, t90)["sensitivity"] >= 0.9
    t95s = choose_threshold(y, p, "specificity:0.95")
    assert binary_metrics(y, p, t95s)["specificity"] >= 0.95
    assert choose_threshold(y, p, "fixed:0.3") == 0.3


@pytest.mark.parametrize("bad", ["yuden", "sensitivity", "sensitivity:abc", "fixed:1.5"])
def test_bad_threshold_rules(bad):
    with pytest.raises(ConfigError):
        parse_threshold_rule(bad)
