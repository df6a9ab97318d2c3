"""Issue 26, Deliver 4: calibration is chosen by cross-validation inside the validation split and never
assumed to help. Synthetic scores, so the right answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from medlens.evaluation.calibration import calibration_errors, select_calibration
from medlens.run.meta import MAX_KNOTS, Calibration


def _cases(scale: float, n: int = 3000, seed: int = 0):
    """Labels drawn from a true probability; scores whose logit is ``scale`` times the true one."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(size=n) * 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return y, 1 / (1 + np.exp(-scale * logit))


def test_auto_keeps_none_on_already_calibrated_scores():
    y, p = _cases(1.0)
    cal, ev = select_calibration("binary", y, p, "auto")
    assert cal is None and ev is not None
    assert ev["chosen"] == "none" and ev["folds"] == 5
    assert set(ev["held_out_log_loss"]) == {"none", "platt", "temperature", "isotonic"}
    # no scaling saved MIN_GAIN of held-out log-loss (the old code fitted Platt here regardless)
    assert ev["held_out_log_loss"]["none"] - min(ev["held_out_log_loss"].values()) < ev["min_gain"]


def test_auto_picks_a_scaler_on_miscalibrated_scores_and_says_by_how_much():
    y, p = _cases(3.0)
    cal, ev = select_calibration("binary", y[:2000], p[:2000], "auto")
    assert cal is not None and ev["chosen"] == cal.method != "none"
    losses = ev["held_out_log_loss"]
    assert ev["improvement"] == pytest.approx(losses["none"] - losses[cal.method]) and ev["improvement"] > 0.05
    after = cal.apply(p[2000:])
    assert calibration_errors(y[2000:], after)["ece"] < 0.5 * calibration_errors(y[2000:], p[2000:])["ece"]


def test_isotonic_is_a_validated_serialisable_calibration():
    rng = np.random.default_rng(3)
    p = rng.random(4000)                                        # a score whose truth is a step, not a logistic:
    y = (rng.random(4000) < np.where(p < 0.5, 0.1, 0.9)).astype(int)   # P(y) = 0.1 below 0.5, 0.9 above
    cal, ev = select_calibration("binary", y, p, "auto")
    assert cal is not None and cal.method == "isotonic" and ev["chosen"] == "isotonic"
    assert cal.knots is not None and 2 <= len(cal.knots[0]) <= MAX_KNOTS
    back = Calibration.model_validate_json(cal.model_dump_json())
    assert np.allclose(back.apply(p), cal.apply(p))
    assert np.all(np.diff(back.apply(np.sort(p))) >= 0)      # monotone
    for bad in ([[0.2, 0.1], [0.1, 0.2]], [[0.1, 0.2], [0.3, 0.2]], [[0.1, float("nan")], [0.1, 0.2]],
                [list(np.linspace(0, 1, MAX_KNOTS + 1))] * 2, None):
        with pytest.raises(ValidationError, match="knots"):
            Calibration(method="isotonic", params={}, knots=bad, n=10)
    with pytest.raises(ValidationError, match="knots"):
        Calibration(method="platt", params={"a": 1.0, "b": 0.0}, knots=[[0, 1], [0, 1]], n=10)


def test_binary_temperature_scales_the_logit():
    cal = Calibration(method="temperature", params={"t": 2.0}, n=10)
    p = np.array([0.5, 1 / (1 + np.exp(-4.0))])
    assert np.allclose(cal.apply(p), [0.5, 1 / (1 + np.exp(-2.0))], atol=1e-6)


def test_the_standalone_loader_understands_isotonic_knots():
    """An ONNX export carries the run's calibration as metadata; the numpy-only loader must accept a valid
    isotonic calibration and refuse knots that are not increasing probabilities."""
    import importlib.util
    from pathlib import Path

    import medlens.serve as serve

    spec = importlib.util.spec_from_file_location("standalone_loader_iso", Path(serve.__file__).parent
                                                  / "standalone_loader.py")
    assert spec is not None and spec.loader is not None
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    cal = Calibration(method="isotonic", params={}, knots=[[0.1, 0.5, 0.9], [0.0, 0.4, 1.0]], n=5)
    args = ("binary", ["a", "b"], {"spatial_dims": 2, "size": [28, 28]}, None)
    loader.check_metadata(*args, cal.model_dump(mode="json"), "sigmoid", 1, [28, 28])
    for bad in ([[0.5, 0.1], [0.0, 1.0]], [[0.1, 0.5], [0.0, 2.0]], None, [[0.1], [0.2]]):
        with pytest.raises(loader.ExportError, match="isotonic knots"):
            loader.check_metadata(*args, {**cal.model_dump(mode="json"), "knots": bad}, "sigmoid", 1, [28, 28])


def test_named_temperature_and_isotonic_are_fitted_on_validation_only():
    """evaluation.calibration temperature / isotonic (issue 26): each gives the scaling it names, fitted on the
    validation arrays alone, equal to an independent fit of the same arrays (scipy; sklearn), recorded as auto's."""
    from scipy.optimize import minimize_scalar
    from sklearn.isotonic import IsotonicRegression

    from medlens.config import config_from_dict
    from medlens.report.dicom_sr import calibration_parameters

    y, p = _cases(3.0, n=1200, seed=5)
    yv, pv, pt = y[:600], p[:600], p[600:]          # validation; the rest stands for test and must not matter
    for name in ("temperature", "isotonic"):
        assert config_from_dict({"name": "c", "data": {"name": "pneumoniamnist"},
                                 "evaluation": {"calibration": name}}).evaluation.calibration == name
        cal, ev = select_calibration("binary", yv, pv, name)
        assert cal is not None and cal.method == name and cal.n == 600 and cal.fitted_on == "val"
        assert ev is not None and ev["setting"] == name and ev["chosen"] == name and ev["n"] == 600
        assert set(ev["held_out_log_loss"]) == {"none", name}
        back = Calibration.model_validate_json(cal.model_dump_json())   # run.json round trip, as auto's
        assert np.allclose(back.apply(pt), cal.apply(pt))
        assert calibration_parameters(SimpleNamespace(calibration=cal, calibration_choice=ev))[0].startswith(
            f"probabilities calibrated ({name}, fitted on validation")
        other, _ = select_calibration("binary", y, p, name)     # fitted on validation + test: a different fit
        assert other is not None and not np.allclose(other.apply(pt), cal.apply(pt))
    z = np.log(np.clip(pv, 1e-7, 1 - 1e-7) / np.clip(1 - pv, 1e-7, 1))

    def nll(t: float) -> float:    # binary temperature by hand: sigmoid(logit / t), mean negative log-likelihood
        q = np.clip(1 / (1 + np.exp(-z / t)), 1e-7, 1 - 1e-7)
        return float(-np.mean(yv * np.log(q) + (1 - yv) * np.log(1 - q)))

    t_ref = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    t_cal = select_calibration("binary", yv, pv, "temperature")[0]
    assert t_cal is not None and t_cal.params["t"] == pytest.approx(t_ref, rel=1e-3) and t_ref > 1.5  # 3x sharp
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(pv, yv.astype(float))
    assert len(iso.X_thresholds_) <= MAX_KNOTS       # no knot thinning: the curve is sklearn's own
    i_cal = select_calibration("binary", yv, pv, "isotonic")[0]
    assert i_cal is not None and np.allclose(i_cal.apply(pt), iso.predict(pt), atol=1e-9)

    rng = np.random.default_rng(1)                    # multi-class temperature: softmax(log p / t) by hand
    logits = rng.normal(size=(900, 4)) * 2
    yk = np.array([rng.choice(4, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    pk = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)

    def nll_k(t: float) -> float:
        s = np.log(pk[:600]) / t
        s = s - s.max(1, keepdims=True)
        return float(-(s[np.arange(600), yk[:600]] - np.log(np.exp(s).sum(1))).mean())

    k_cal = select_calibration("multiclass", yk[:600], pk[:600], "temperature")[0]
    t_k = minimize_scalar(nll_k, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    assert k_cal is not None and k_cal.params["t"] == pytest.approx(t_k, rel=1e-3) and t_k > 1.5


def test_a_calibration_name_that_is_wrong_or_does_not_fit_is_one_config_error_line():
    from medlens.config import config_from_dict
    from medlens.errors import ConfigError
    from medlens.report.dicom_sr import calibration_parameters

    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "c", "data": {"name": "pneumoniamnist"}, "evaluation": {"calibration": "isotonc"}})
    assert "\n" not in str(e.value) and "did you mean 'isotonic'" in str(e.value)
    assert "evaluation.calibration" in str(e.value)
    y, p = _cases(2.0, n=300)
    with pytest.raises(ConfigError, match="isotonic: binary") as e:   # one score per case only
        select_calibration("multiclass", y, np.stack([1 - p, p], 1), "isotonic")
    assert "\n" not in str(e.value)
    # a named scaling that validation cannot fit (one class) leaves the model's own, and SR/FHIR say so
    cal, ev = select_calibration("binary", np.ones(50, int), p[:50], "isotonic")
    assert cal is None and ev is not None and ev["setting"] == "isotonic" and ev["chosen"] == "none"
    assert calibration_parameters(SimpleNamespace(calibration=None, calibration_choice=ev)) == [
        "probabilities not calibrated (the model's own: evaluation.calibration isotonic gave no usable fit on "
        "validation)"]
