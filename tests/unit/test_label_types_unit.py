"""Issue 26, deliver 6, the parts without training: the regression task's rules, its metrics and split-conformal
interval against hand computations, the scaled network output, and run.json's checks of the new fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medlens.engine.train import build_network
from medlens.errors import DataError
from medlens.evaluation.intervals import conformal_interval, interval_coverage
from medlens.evaluation.metrics import compute_metrics, multilabel_metrics
from medlens.run import RunMeta
from medlens.run.meta import SCHEMA_VERSION
from medlens.tasks import get_task


def test_regression_task_rules():
    t = get_task("regression")
    assert t.numeric and not t.has_threshold and not t.exclusive and t.calibration_method("auto") is None
    assert t.n_outputs(1) == 1 and t.outputs_problem(1, 1) is None and t.outputs_problem(2, 1) is not None
    z = torch.tensor([[2.5], [-1.0]])
    assert torch.equal(t.activation(z), torch.tensor([2.5, -1.0]))   # the output is the value
    assert float(t.loss(z, torch.tensor([1.5, -1.0]))) == pytest.approx((1.0 ** 2 + 0.0) / 2)
    assert t.decide(np.array([2.5, -1.0]), ["age"]) == [("2.5", 2.5), ("-1", -1.0)]
    assert t.monitor == "val_loss" and t.coding == "measurement" and t.export_activation == "identity"


def test_regression_metrics_and_cis_against_hand_computation():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.0, 5.0])
    m = compute_metrics("regression", y, p, n_boot=200)["metrics"]
    assert m["mae"]["value"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert m["rmse"]["value"] == pytest.approx(np.sqrt((0.25 + 0 + 1 + 1) / 4))
    assert m["r2"]["value"] == pytest.approx(1 - 2.25 / 5.0)
    assert m["mae"]["ci_low"] <= m["mae"]["value"] <= m["mae"]["ci_high"]


def test_split_conformal_half_width_is_the_right_order_statistic():
    y = np.zeros(9)
    pred = np.arange(1, 10, dtype=float)      # residuals 1..9
    iv = conformal_interval(y, pred, 0.8)     # ceil(10 x 0.8) = 8th smallest residual
    assert iv.half_width == 8.0 and iv.n == 9 and iv.fitted_on == "val"
    assert conformal_interval(y, pred, 0.95).half_width == 9.0   # ceil(9.5) = 10 > n: the largest
    assert interval_coverage(y, pred, 8.0) == pytest.approx(8 / 9)


def test_multilabel_per_label_metrics_at_their_thresholds():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.4], [0.3, 0.35], [0.6, 0.8], [0.1, 0.1]])
    m = multilabel_metrics(y, p, np.array([0.5, 0.3]), ["a", "b"])
    assert m["a: sensitivity"] == 1.0 and m["b: sensitivity"] == 1.0 and m["b: specificity"] == 0.5
    assert m["macro_specificity"] == pytest.approx((1.0 + 0.5) / 2)
    assert multilabel_metrics(y, p)["accuracy"] == pytest.approx(((p >= 0.5) == y).mean())   # as before


def test_a_numeric_target_network_answers_in_its_units():
    torch.manual_seed(0)
    net = build_network("small_cnn", 1, 1, 2, (28, 28), {"widths": [4, 8]}, [0.5], [0.2], [50.0, 12.0])
    plain = build_network("small_cnn", 1, 1, 2, (28, 28), {"widths": [4, 8]}, [0.5], [0.2])
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("target_")})
    net.eval(), plain.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x) * 12.0 + 50.0)
    assert "target_mean" not in plain.state_dict()   # classifiers' weights files are unchanged


def _meta(**over) -> dict:
    d = {"schema_version": SCHEMA_VERSION, "task": "regression", "model": "small_cnn", "in_channels": 1,
         "n_outputs": 1, "input_size": [28, 28], "class_names": ["age"],
         "preprocessing": {"spatial_dims": 2, "size": [28, 28], "mean": [0.5], "std": [0.2]}}
    d.update(over)
    return d


@pytest.mark.parametrize("over, needle", [
    ({"interval": {"coverage": 1.5, "half_width": 1.0, "n": 10}}, "interval.coverage"),
    ({"interval": {"coverage": 0.9, "half_width": -1.0, "n": 10}}, "interval.half_width"),
    ({"target_scale": [40.0, 0.0]}, "target_scale"),
    ({"task": "multilabel", "class_names": ["a", "b"], "n_outputs": 2,
      "label_thresholds": {"a": 0.5, "b": 1.5}}, "label_thresholds"),
    ({"task": "multilabel", "class_names": ["a", "b"], "n_outputs": 2,
      "label_thresholds": {"b": 0.5, "a": 0.5}}, "label_thresholds"),
    ({"task": "binary", "class_names": ["a", "b"], "interval": {"coverage": 0.9, "half_width": 1.0, "n": 3}},
     "interval"),
])
def test_run_json_refuses_bad_label_type_fields_in_one_line(tmp_path, over, needle):
    (tmp_path / "run.json").write_text(json.dumps(_meta(**over)))
    with pytest.raises(DataError) as e:
        RunMeta.load(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    (tmp_path / "run.json").write_text(json.dumps(_meta(interval={"coverage": 0.9, "half_width": 2.0, "n": 5},
                                                        target_scale=[40.0, 12.0])))
    assert RunMeta.load(tmp_path).interval.half_width == 2.0   # pyright: ignore[reportOptionalMemberAccess]
