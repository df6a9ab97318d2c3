"""Issue 26, deliver 6: label types of one's own data. A multi-label CSV manifest (several 0/1 label columns)
and a regression CSV manifest (one numeric target column) train, evaluate, predict, serve and export end to end.

Both are built from real images: RetinaMNIST (real colour fundus photographs, 28x28, DeepDRiD) written as PNG,
with the dataset's real diabetic-retinopathy grade (0-4, graded by ophthalmologists) as the numbers:

- multi-label: three labels read from the real grade, ``any_dr`` (grade >= 1), ``referable_dr`` (grade >= 2) and
  ``severe_dr`` (grade >= 3);
- regression: the real grade itself, ``dr_grade``, as a numeric score (unit ``{grade}``, a UCUM annotation).

The manifest keeps RetinaMNIST's official train/val/test split (``split`` column), capped for speed. A few test
images are also written as DICOM ophthalmic photographs (modality OP, which the runs are told their PNGs are), so
SR and FHIR run on in-profile DICOM inputs. Every expected number is computed here from the outputs (sklearn,
numpy), never copied from medlens.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score, roc_curve

from conftest import shared_folder
from interop_checks import check_bundle, dciodvfy, resources
from medlens.config import config_from_dict
from medlens.errors import ConfigError, DataError
from medlens.run import Predictor, Run
from medlens.workflow.train import train

N = {"train": 240, "val": 80, "test": 100}
LABELS = ["any_dr", "referable_dr", "severe_dr"]
N_DICOM = 3


def _build_manifest(folder: Path, data_root: Path) -> Path:
    z = np.load(data_root / "medmnist" / "retinamnist.npz")
    rows = []
    for split, n in N.items():
        images, grades = z[f"{split}_images"][:n], z[f"{split}_labels"][:n, 0]
        for i, (img, g) in enumerate(zip(images, grades)):
            rel = f"images/{split}_{i:04d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / rel)
            rows.append({"path": rel, "split": split, "dr_grade": int(g), "any_dr": int(g >= 1),
                         "referable_dr": int(g >= 2), "severe_dr": int(g >= 3)})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    # the first test images as DICOM ophthalmic photographs (RGB), one study each
    for i, img in enumerate(z["test_images"][:N_DICOM]):
        sc = hd.sc.SCImage(pixel_array=img, photometric_interpretation="RGB", bits_allocated=8,
                           coordinate_system="PATIENT", study_instance_uid=generate_uid(),
                           series_instance_uid=generate_uid(), series_number=1, sop_instance_uid=generate_uid(),
                           instance_number=1, manufacturer="medlens tests", patient_id=f"RETINA-{i}",
                           patient_name=f"Retina^{i}", patient_orientation=("L", "F"))
        sc.Modality = "OP"
        (folder / "dicom").mkdir(exist_ok=True)
        sc.save_as(folder / "dicom" / f"test_{i}.dcm")
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, data_root) -> Path:
    return shared_folder(tmp_path_factory, "label_types_manifest", lambda f: _build_manifest(f, data_root))


def _config(out: Path, manifest: Path, name: str, task: str, **data) -> dict:
    return {"name": name, "task": task, "seed": 0, "output_dir": str(out),
            "data": {"source": "csv", "path": str(manifest), "size": 28, "color": "rgb", "modality": "OP", **data},
            "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
            "train": {"epochs": 4, "batch_size": 32, "lr": 0.003, "precision": "32"},
            "evaluation": {"bootstrap": 50},
            "explain": {"method": "gradcam"}}


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory, manifest) -> Path:
    return shared_folder(tmp_path_factory, "label_types_multilabel", lambda f: train(config_from_dict(
        _config(f, manifest, "multilabel", "classification", label_columns=LABELS)), progress_bar=False))


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, manifest) -> Path:
    return shared_folder(tmp_path_factory, "label_types_regression", lambda f: train(config_from_dict(
        _config(f, manifest, "regression", "regression", target_column="dr_grade", target_unit="{grade}")),
        progress_bar=False))


def _dicoms(manifest: Path) -> list[Path]:
    return sorted((manifest.parent / "dicom").glob("*.dcm"))


# ------------------------------------------------------------------------------------------ multi-label
def test_multilabel_manifest_trains_with_per_label_thresholds_and_metrics(multilabel_run):
    run = Run.open(multilabel_run)
    assert run.meta.task == "multilabel" and run.meta.class_names == LABELS
    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    pred = pd.read_csv(multilabel_run / "predictions.csv")
    val, test = pred[pred.split == "val"], pred[pred.split == "test"]
    assert len(val) == N["val"] and len(test) == N["test"]
    # each label's threshold is Youden's J on that label's validation column (never test)
    for j, name in enumerate(LABELS):
        fpr, tpr, thr = roc_curve(val[f"label_{j}"], val[f"prob_{j}"])
        assert run.meta.label_thresholds[name] == pytest.approx(float(np.clip(thr[np.argmax(tpr - fpr)], 0, 1)))
    # per-label AUC, sensitivity and specificity at the label's threshold, and their macro means, with CIs
    m = metrics["test"]["metrics"]
    sens = []
    for j, name in enumerate(LABELS):
        y, p, t = test[f"label_{j}"].to_numpy(), test[f"prob_{j}"].to_numpy(), run.meta.label_thresholds[name]
        assert m[f"{name}: auc"]["value"] == pytest.approx(roc_auc_score(y, p))
        s = float(((p >= t) & (y == 1)).sum() / (y == 1).sum())
        sens.append(s)
        assert m[f"{name}: sensitivity"]["value"] == pytest.approx(s)
        assert (test[f"pred_{j}"].to_numpy() == (p >= t)).all()
        assert m[f"{name}: auc"]["ci_low"] <= m[f"{name}: auc"]["value"] <= m[f"{name}: auc"]["ci_high"]
    assert m["macro_sensitivity"]["value"] == pytest.approx(np.mean(sens))
    assert m["auc"]["value"] == pytest.approx(np.mean([m[f"{n}: auc"]["value"] for n in LABELS]))
    assert m["auc"]["value"] > 0.6, m["auc"]   # real fundus photographs: the grades are learnt, if roughly
    html = (multilabel_run / "report.html").read_text()
    assert 'id="label-thresholds"' in html and "referable_dr: auc" in html


def test_multilabel_predict_sr_fhir_serve_and_export(multilabel_run, manifest, tmp_path):
    from starlette.testclient import TestClient

    from medlens.serve import ServeSettings, create_app
    from medlens.workflow.export import export_run
    from medlens.workflow.interop import predict_export

    run = Run.open(multilabel_run)
    t = run.meta.label_thresholds
    rows, done = predict_export(run, _dicoms(manifest), tmp_path / "out", {"sr", "fhir"})
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    for r, (_, row) in zip(rows, table.iterrows()):
        for name in LABELS:
            assert row[f"pred_{name}"] == int(row[f"p_{name}"] >= t[name])
        assert r.prediction == (", ".join(n for n in LABELS if r.probabilities[n] >= t[n]) or "none")
    for ex, r in zip(done, rows):
        dciodvfy(ex.files["sr"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = hd.sr.srread(ex.files["sr"]).content.get_image_measurement_groups()
        assert len(groups) == len(LABELS)   # one group per label: Present when it reaches its own threshold
        for g in groups:
            name = str(g.finding_type.meaning)
            (q,) = g.get_qualitative_evaluations()
            assert str(q.value.meaning) == ("Present" if r.probabilities[name] >= t[name] else "Absent")
        check_bundle(ex.files["fhir"], pydicom.dcmread(ex.files["sr"]))

    app = create_app([multilabel_run], ServeSettings(backend="torch"))
    name = next(iter(app.state.models))
    with TestClient(app, base_url="http://localhost") as c:
        body = c.post(f"/v1/models/{name}/predict", files={"file": ("x.dcm", _dicoms(manifest)[0].read_bytes())},
                      params={"heatmap": "false"}).json()
        assert body["label_thresholds"] == t and body["probabilities"] == pytest.approx(rows[0].probabilities)

    report = export_run(multilabel_run, "onnx", n_parity=40)   # raises when ONNX and PyTorch disagree
    assert report["max_abs_prob_diff"] < report["tolerance"]
    assert json.loads(report["metadata"]["medlens.label_thresholds"]) == t
    from medlens.serve.standalone_loader import ExportedModel   # numpy + onnxruntime only: the same decisions

    png = manifest.parent / "images" / "test_0000.png"
    ours = Predictor(run).predict_files([png])[0]
    theirs = ExportedModel(next((multilabel_run / "export").glob("*.onnx")), run=multilabel_run).predict(str(png))
    assert theirs["prediction"] == ours.prediction
    assert theirs["probabilities"] == pytest.approx(ours.probabilities, abs=1e-4)


# ------------------------------------------------------------------------------------------ regression
def test_regression_manifest_trains_with_metrics_and_a_conformal_interval(regression_run, manifest):
    run = Run.open(regression_run)
    assert run.meta.task == "regression" and run.meta.class_names == ["dr_grade"] and run.meta.n_outputs == 1
    # the network learns the grade standardised by the training grades and answers in grades
    train_grades = pd.read_csv(manifest).query("split == 'train'")["dr_grade"].to_numpy(float)
    assert run.meta.target_scale == pytest.approx([train_grades.mean(), train_grades.std()], rel=1e-5)
    assert run.meta.threshold is None and run.meta.calibration is None and run.config.train.monitor == "val_loss"
    pred = pd.read_csv(regression_run / "predictions.csv")
    val, test = pred[pred.split == "val"], pred[pred.split == "test"]
    # split-conformal: the ceil((n + 1) 0.9)-th smallest absolute validation residual
    res = np.sort(np.abs(val["label"] - val["value"]).to_numpy())
    k = math.ceil((len(res) + 1) * 0.9)
    iv = run.meta.interval
    assert iv is not None and iv.n == N["val"] and iv.coverage == 0.9
    assert iv.half_width == pytest.approx(res[k - 1], rel=1e-5)
    assert np.allclose(test["upper"] - test["value"], iv.half_width, atol=1e-5)
    metrics = json.loads((regression_run / "metrics.json").read_text())
    m = metrics["test"]["metrics"]
    y, p = test["label"].to_numpy(), test["value"].to_numpy()
    assert m["mae"]["value"] == pytest.approx(mean_absolute_error(y, p), rel=1e-5)
    assert m["rmse"]["value"] == pytest.approx(math.sqrt(mean_squared_error(y, p)), rel=1e-5)
    assert m["r2"]["value"] == pytest.approx(r2_score(y, p), rel=1e-4, abs=1e-6)
    for k_ in ("mae", "rmse", "r2"):
        assert m[k_]["ci_low"] <= m[k_]["value"] <= m[k_]["ci_high"]
    covered = float(np.mean(np.abs(y - p) <= iv.half_width))
    assert metrics["test"]["interval"]["coverage_observed"] == pytest.approx(covered)
    assert covered >= 0.75, covered   # 90% nominal; 100 exchangeable test cases
    assert r2_score(y, p) > 0.05   # the real grade is learnt from the fundus photographs, if roughly (R² 0.25)
    history = pd.read_csv(regression_run / "history.csv")
    assert {"train_mae", "val_mae"} <= set(history.columns) and "train_acc" not in history.columns
    assert (regression_run / "plots" / "predicted_vs_true.png").is_file()
    assert not (regression_run / "plots" / "roc.png").exists()
    html = (regression_run / "report.html").read_text()
    assert "Predicted against true value" in html and 'id="prediction-interval"' in html
    assert "R² (coefficient of determination)" in html


def test_regression_predict_sr_fhir_serve_and_export(regression_run, manifest, tmp_path):
    from starlette.testclient import TestClient

    from medlens.serve import ServeSettings, create_app
    from medlens.serve.standalone_loader import ExportedModel
    from medlens.workflow.export import export_run
    from medlens.workflow.interop import predict_export

    run = Run.open(regression_run)
    hw = run.meta.interval.half_width
    rows, done = predict_export(run, _dicoms(manifest), tmp_path / "out", {"sr", "fhir"})
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert {"value", "lower", "upper"} <= set(table.columns) and "probability" not in table.columns
    assert np.allclose(table["upper"] - table["value"], hw) and np.allclose(table["value"] - table["lower"], hw)
    for ex, r in zip(done, rows):
        dciodvfy(ex.files["sr"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (g,) = hd.sr.srread(ex.files["sr"]).content.get_image_measurement_groups()
        meas = {str(x.name.meaning): x for x in g.get_measurements()}
        assert meas["dr_grade"].value == pytest.approx(r.value, rel=1e-5)
        assert str(meas["dr_grade"].unit.value) == "{grade}"
        assert meas["Prediction interval upper limit"].value == pytest.approx(r.value + hw, rel=1e-5)
        bundle = check_bundle(ex.files["fhir"], pydicom.dcmread(ex.files["sr"]))
        quantities = [o["valueQuantity"] for o in resources(bundle)["Observation"] if "valueQuantity" in o]
        assert any(q["code"] == "{grade}" and q["value"] == pytest.approx(r.value, rel=1e-5) for q in quantities)

    png = manifest.parent / "images" / "test_0000.png"
    app = create_app([regression_run], ServeSettings(backend="torch"))
    name = next(iter(app.state.models))
    with TestClient(app, base_url="http://localhost") as c:
        body = c.post(f"/v1/models/{name}/predict", files={"file": ("x.png", png.read_bytes())},
                      params={"heatmap": "false"}).json()
        value = Predictor(run).predict_files([png])[0].value
        assert body["value"] == pytest.approx(value, rel=1e-5)
        assert body["lower"] == pytest.approx(value - hw) and body["upper"] == pytest.approx(value + hw)
        assert "probability" not in body and body["unit"] == "{grade}"
        sr = c.post(f"/v1/models/{name}/predict", files={"file": ("x.dcm", _dicoms(manifest)[0].read_bytes())},
                    params={"format": "fhir"})
        assert sr.status_code == 200 and "valueQuantity" in sr.text

    from medlens.explain.run import explain_files

    (ex,) = explain_files(run, [png], "gradcam", out_dir=tmp_path / "maps")   # what raises the predicted value
    assert ex["target"] == "higher dr_grade" and ex["value"] == pytest.approx(value, rel=1e-5)

    export_run(regression_run, "onnx", n_parity=40)   # refuses (raises) when ONNX and PyTorch disagree
    onnx = next((regression_run / "export").glob("*.onnx"))
    loaded = ExportedModel(onnx, run=regression_run)
    out = loaded.predict(str(png))
    assert out["value"] == pytest.approx(value, abs=1e-3) and out["upper"] - out["value"] == pytest.approx(hw)


# ------------------------------------------------------------------------------------------ refusals
def _refused(manifest: Path, tmp_path: Path, column: str, value, **data) -> str:
    df = pd.read_csv(manifest)
    df[column] = df[column].astype(object)
    df.loc[7, column] = value
    bad = manifest.parent / f"bad_{column}.csv"
    df.to_csv(bad, index=False)
    task = "regression" if "target_column" in data else "classification"
    cfg = config_from_dict(_config(tmp_path, bad, "bad", task, **data))
    from medlens.transforms.preprocess import prepared_data

    with pytest.raises(DataError) as e:
        prepared_data(cfg.data, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and bad.name in msg and "line(s) 9" in msg, msg   # data row 7 is line 9
    return msg


def test_bad_label_cells_are_refused_in_one_line_naming_file_and_line(manifest, tmp_path):
    assert "a regression target is a finite number" in _refused(manifest, tmp_path, "dr_grade", "severe",
                                                                target_column="dr_grade")
    assert "holds 0 or 1" in _refused(manifest, tmp_path, "any_dr", 2, label_columns=LABELS)


def test_config_rules_of_label_columns_and_targets(manifest, tmp_path):
    base = _config(tmp_path, manifest, "x", "classification")
    for data, needle in (({"target_column": "dr_grade"}, "regression (task: regression)"),
                         ({"label_columns": ["any_dr"]}, "at least two"),
                         ({"label_columns": LABELS, "positive_class": "any_dr"}, "data.label_map"),
                         ({"source": "medmnist", "name": "retinamnist", "label_columns": LABELS}, "'csv'")):
        with pytest.raises(ConfigError) as e:
            config_from_dict({**base, "data": {**base["data"], **data}})
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="data.target_column"):
        config_from_dict({**base, "task": "regression"})
    from medlens.transforms.preprocess import prepared_data

    missing = config_from_dict({**base, "data": {**base["data"], "label_columns": ["any_dr", "no_such_column"]}})
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['no_such_column'\]"):
        prepared_data(missing.data, seed=0)
