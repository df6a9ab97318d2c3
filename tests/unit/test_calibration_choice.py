"""Issue 26, Deliver 4: calibration is chosen by cross-validation inside the validation split and never
assumed to help. Synthetic scores, so the right answer is known."""

from __future__ import annotations

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
