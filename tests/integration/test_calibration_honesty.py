"""Issue 26, Deliver 4 and 5 on real data: the report warns when scaling made the test probabilities worse
calibrated, SR and FHIR say which calibration the probability carries, and the report's explanation is
scored against random."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from interop_checks import dciodvfy, resources

pytestmark = pytest.mark.integration


def _ece(run: Path) -> tuple[float, float | None]:
    c = json.loads((run / "metrics.json").read_text())["calibration"]["test"]
    return c["before"]["ece"]["value"], c.get("after", {}).get("ece", {}).get("value")


def test_report_warns_with_both_eces_when_scaling_worsens_test_ece(trained_run, tmp_path):
    from medlens.evaluation.evaluate import evaluate_run
    from medlens.report.html import write_report
    from medlens.run import Run
    from medlens.run.meta import Calibration

    # the shared run as trained: the box appears exactly when its scaling made the test ECE worse
    before, after = _ece(trained_run)
    html = (trained_run / "report.html").read_text()
    assert ('id="calibration-worse"' in html) == (after is not None and after > before)
    # a constructed case: a steep, shifted Platt scaling (fitted on nothing) must make test ECE worse
    run_dir = tmp_path / "bad_scaling"
    shutil.copytree(trained_run, run_dir)
    run = Run.open(run_dir)
    run.meta.calibration = Calibration(method="platt", params={"a": 4.0, "b": 2.5}, n=1)
    run.meta.save(run_dir)
    run = Run.open(run_dir)
    evaluate_run(run)
    write_report(run)
    before, after = _ece(run_dir)
    assert after is not None and after > before
    html = (run_dir / "report.html").read_text()
    box = re.search(r'<li class="warn" id="calibration-worse">(.*?)</li>', html, re.S)
    assert box is not None, "no warning box although scaling made the test ECE worse"
    assert f"ECE {before:.3f} uncalibrated, {after:.3f} after scaling" in box.group(1)
    assert "platt" in box.group(1)


def test_sr_and_fhir_say_which_calibration_the_probability_carries(tmp_path, data_root):
    from medlens.report.dicom_sr import Algorithm, classification_sr, read_tid1500
    from medlens.report.fhir import sr_to_bundle
    from medlens.run.meta import Calibration

    src = pydicom.dcmread(sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[60])
    pred = SimpleNamespace(prediction="pneumonia", probabilities={"normal": 0.3, "pneumonia": 0.7})
    iso = Calibration(method="isotonic", params={}, knots=[[0.1, 0.9], [0.2, 0.8]], n=50)
    cases = {
        "isotonic": (SimpleNamespace(calibration=iso, model="cnn",
                                     calibration_choice={"setting": "auto", "chosen": "isotonic",
                                                         "improvement": 0.0421}),
                     "probabilities calibrated (isotonic, fitted on validation; held-out log-loss lower by 0.0421)"),
        "none": (SimpleNamespace(calibration=None, model="cnn",
                                 calibration_choice={"setting": "auto", "chosen": "none", "improvement": 0.0}),
                 "probabilities not calibrated (the model's own: no scaling lowered the held-out log-loss)"),
        # named in the config (evaluation.calibration: temperature / isotonic): the same wording as auto's pick
        "named": (SimpleNamespace(calibration=Calibration(method="temperature", params={"t": 1.7}, n=50), model="cnn",
                                  calibration_choice={"setting": "temperature", "chosen": "temperature",
                                                      "improvement": -0.002}),
                  "probabilities calibrated (temperature, fitted on validation)"),
        "named-unfit": (SimpleNamespace(calibration=None, model="cnn",
                                        calibration_choice={"setting": "isotonic", "chosen": "none"}),
                        "probabilities not calibrated (the model's own: evaluation.calibration isotonic gave no "
                        "usable fit on validation)"),
    }
    for name, (meta, text) in cases.items():
        algo = Algorithm.of_run(SimpleNamespace(meta=meta, weights_sha256="ab" * 32))
        sr = classification_sr([src], pred, ["normal", "pneumonia"], algo, 0.5)
        path = tmp_path / f"{name}.dcm"
        sr.save_as(path)
        dciodvfy(path)
        params = [str(it.TextValue) for it in _walk(pydicom.dcmread(path).ContentSequence)
                  if it.ConceptNameCodeSequence[0].CodeValue == "111002"]
        assert text in params, params
        bundle = json.loads(sr_to_bundle(read_tid1500(path)).model_dump_json())
        (dev,) = resources(bundle)["Device"]
        assert text in [p["valueString"] for p in dev["property"]]


def _walk(items):
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))


def test_report_method_is_the_most_faithful_on_validation_and_scored_against_random(trained_run, tmp_path):
    from medlens.explain.run import write_report_section
    from medlens.report.html import write_report
    from medlens.run import Run

    run_dir = tmp_path / "explained"
    shutil.copytree(trained_run, run_dir)
    run = Run.open(run_dir)
    assert run.config.explain.method is None
    write_report_section(run)                        # no method named: chosen on validation images
    d = json.loads((run_dir / "report_sections" / "explanations.json").read_text())["data"]
    cands = d["chosen_on"]["candidates"]
    assert d["chosen_on"]["split"] == "val" and len(cands) >= 3 and "gradcam" in [c["method"] for c in cands]
    assert d["method"] == max(cands, key=lambda c: c["insertion_auc"] - c["deletion_auc"])["method"]
    s = d["shown"]
    assert s["method"] == d["method"] and s["split"] == "test" and s["n"] == run.config.explain.score_images
    assert s["beats_random_deletion"] == (s["deletion_auc"] < s["random_deletion_auc"])
    assert s["beats_random_insertion"] == (s["insertion_auc"] > s["random_insertion_auc"])
    html = (write_report(run)).read_text()
    box = re.search(r'<div id="explanation-faithfulness"[^>]*>(.*?)</div>', html, re.S)
    assert box is not None
    text = box.group(1)
    assert f"deletion AUC {s['deletion_auc']:.3f} against {s['random_deletion_auc']:.3f}" in text
    assert f"insertion AUC {s['insertion_auc']:.3f} against {s['random_insertion_auc']:.3f}" in text
    beats = s["beats_random_deletion"] and s["beats_random_insertion"]
    assert ("It beats random on both." in text) == beats
    assert ("does not beat random" in text) == (not beats)


@pytest.mark.parametrize("deletion, insertion, says", [
    ((0.20, 0.30), (0.70, 0.60), "It beats random on both."),
    ((0.657, 0.626), (0.70, 0.60), "It does not beat random on deletion"),   # issue 26's Grad-CAM
    ((0.70, 0.60), (0.50, 0.60), "It does not beat random on deletion or insertion"),
])
def test_explanation_section_says_plainly_whether_the_method_beats_random(deletion, insertion, says):
    from jinja2 import Environment, PackageLoader

    from medlens.report.html import format_number

    env = Environment(loader=PackageLoader("medlens.report", "templates"), autoescape=True)
    env.globals["num"] = format_number
    shown = {"n": 32, "split": "test", "deletion_auc": deletion[0], "random_deletion_auc": deletion[1],
             "insertion_auc": insertion[0], "random_insertion_auc": insertion[1],
             "beats_random_deletion": deletion[0] < deletion[1], "beats_random_insertion": insertion[0] > insertion[1]}
    html = env.get_template("sections/explanations.html").render(
        d={"method": "gradcam", "groups": [], "faithfulness": [], "chosen_on": None, "shown": shown})
    assert says in html
    assert ("warn" in html.split('id="explanation-faithfulness"')[1].split(">")[0]) == (says != "It beats random on both.")
