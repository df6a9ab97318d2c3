"""Issue 26, deliver 3: nothing unsafe leaves medlens. A real CT slice (LIDC-IDRI-0001) given to the chest X-ray
model (the shared PneumoniaMNIST run) is outside its training data: SR/FHIR export refuses it in one line and
writes nothing; with --allow-out-of-profile the SR carries a qualitative evaluation saying so (dciodvfy clean)
and the FHIR Bundle a note. serve refuses it (422, the reasons in the JSON) unless started with
--allow-out-of-profile, and then answers with the reasons. The SR quotes the operating point of the split it was
measured on and names it. (The MRI-model-on-CT case against a real Orthanc: tests/e2e/test_pacs_roundtrip.py.)"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from clirun import medlens  # in-process: the console script's entry point
from interop_checks import dciodvfy, resources


def _one_line_error(r, *needles) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ct_slice(data_root) -> Path:
    return sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[60]


def _qualitative(sr_path: Path) -> list[tuple[str, str]]:
    import highdicom as hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
        return [(str(q.name.meaning), str(q.value.meaning)) for q in group.get_qualitative_evaluations()]


def test_ct_slice_to_the_xray_model_is_refused_then_exported_with_the_warning(trained_run, ct_slice, tmp_path):
    out = tmp_path / "o"
    line = _one_line_error(medlens("predict", trained_run, ct_slice, "--out", out, "--outputs", "sr,fhir"),
                           ct_slice.name, "outside the training data", "modality CT", "--allow-out-of-profile")
    assert "refused" in line
    assert not out.exists()                                      # nothing written, not even predictions.csv
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no partial folder left either

    r = medlens("predict", trained_run, ct_slice, "--out", out, "--outputs", "sr,fhir", "--allow-out-of-profile",
                check=True)
    assert "outside the training inputs" in r.stderr             # the console says so too
    sr_path = out / f"{ct_slice.stem}_sr.dcm"
    dciodvfy(sr_path)
    qe = _qualitative(sr_path)
    assert ("Input outside the training data", "Yes") in qe
    reasons = [v for k, v in qe if k == "Outside the training data because"]
    assert any(v.startswith("modality CT (CT) but the model was trained on DX") for v in reasons), reasons
    assert any(v.startswith("size 512x512 px") for v in reasons), reasons
    bundle = json.loads((out / f"{ct_slice.stem}_fhir.json").read_text())
    (report,) = resources(bundle)["DiagnosticReport"]
    (note,) = report["note"]
    assert "outside the training data" in note["text"] and "modality CT" in note["text"]
    # the out-of-profile evaluations also reach FHIR as Observations of the group
    assert any(o.get("valueCodeableConcept", {}).get("coding", [{}])[0].get("display") == "Yes"
               and o["code"]["coding"][0]["display"] == "Input outside the training data"
               for o in resources(bundle)["Observation"])


def test_the_sr_quotes_the_operating_point_of_the_split_it_was_measured_on(trained_run, tmp_path):
    from medlens.report.dicom_sr import operating_codes
    from medlens.run import Run
    from medlens.run.operating import operating_point

    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["evaluated_split"] == "test"
    test, val = m["test"]["metrics"], m["val"]["metrics"]
    op = operating_point(Run.open(trained_run))
    assert op == {"split": "test", "sensitivity": pytest.approx(test["sensitivity"]["value"]),
                  "specificity": pytest.approx(test["specificity"]["value"])}
    sens, spec = operating_codes(op["split"])
    assert sens[1] == "Sensitivity at validation threshold on test" and "on test" in spec[1]
    # a metrics.json of a run never evaluated on test: the validation figures, named as such
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    del m["evaluated_split"], m["test"]
    (run / "metrics.json").write_text(json.dumps(m))
    op = operating_point(Run.open(run))
    assert op["split"] == "val" and op["sensitivity"] == pytest.approx(val["sensitivity"]["value"])
    assert operating_codes("val")[0][1] == "Sensitivity at threshold on validation"


def test_serve_refuses_an_out_of_profile_upload_unless_started_with_the_flag(trained_run, ct_slice, data_root):
    """In-process (the app under starlette's TestClient): the CT slice to the X-ray model is a 422 with the
    reasons in the JSON, as JSON and as DICOM SR; an X-ray test image of the model's own data is answered as
    before. With ``allow_out_of_profile`` (``medlens serve --allow-out-of-profile``) the CT slice is answered,
    with the reasons, and its SR carries the qualitative evaluation."""
    from PIL import Image
    from starlette.testclient import TestClient

    from medlens.serve import ServeSettings, create_app

    png = np.load(data_root / "medmnist" / "pneumoniamnist.npz")["test_images"][0]
    buf = __import__("io").BytesIO()
    Image.fromarray(png).save(buf, format="PNG")
    ct = ct_slice.read_bytes()
    for allow in (False, True):
        app = create_app([trained_run], ServeSettings(backend="torch", allow_out_of_profile=allow))
        name = next(iter(app.state.models))
        with TestClient(app, base_url="http://localhost") as c:
            ok = c.post(f"/v1/models/{name}/predict", files={"file": ("x.png", buf.getvalue())},
                        params={"heatmap": "false"})
            assert ok.status_code == 200 and "outside_training_data" not in ok.json(), ok.text[:300]
            r = c.post(f"/v1/models/{name}/predict", files={"file": ("ct.dcm", ct)}, params={"heatmap": "false"})
            sr = c.post(f"/v1/models/{name}/predict", files={"file": ("ct.dcm", ct)}, params={"format": "dicom-sr"})
            if not allow:
                assert r.status_code == 422, r.text[:300]
                err = r.json()["error"]
                assert err["type"] == "OutOfProfile" and err["outside_training_data"] is True
                assert any(x.startswith("modality CT") for x in err["reasons"]), err
                assert "--allow-out-of-profile" in err["message"] and "\n" not in err["message"]
                assert sr.status_code == 422 and sr.json()["error"]["type"] == "OutOfProfile"
            else:
                assert r.status_code == 200, r.text[:300]
                body = r.json()
                assert body["outside_training_data"] is True and "prediction" in body
                assert any(x.startswith("modality CT") for x in body["input_warnings"])
                assert sr.status_code == 200
                ds = pydicom.dcmread(__import__("io").BytesIO(sr.content))
                meanings = [str(it.ConceptNameCodeSequence[0].CodeMeaning) for it in _walk(ds.ContentSequence)]
                assert "Input outside the training data" in meanings


def _walk(items):
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))


def test_body_part_is_part_of_the_profile():
    """A profile records the training headers' BodyPartExamined; an input whose header names another body part
    is outside it, one whose header says nothing is not judged on it."""
    from medlens.run.profile import InputProfile, check_input

    hist = [0.0] * 34
    hist[10] = 1.0
    prof = InputProfile(modality="DX", body_part="CHEST", hist_range=[0.0, 1.0], hist=hist, distance_limit=0.5, n=4)
    x = np.full((1, 28, 28), 9.5 / 32, np.float32)   # every pixel in the profile's histogram bin
    assert check_input(prof, x, "DX", body_part="chest") == []
    assert check_input(prof, x, "DX", body_part=None) == []
    assert check_input(prof, x, "DX", body_part="SKULL") == ["body part SKULL but the model was trained on CHEST images"]


def test_a_classifier_trained_on_dicom_records_the_body_part(tmp_path, data_root):
    """The profile of a DICOM folder dataset (real LIDC chest CT slices, BodyPartExamined CHEST, one patient
    each) records CT and CHEST from the headers; the same slice saying HEAD is outside it."""
    from medlens.config import config_from_dict
    from medlens.run.profile import check_input, profile_of
    from medlens.transforms.preprocess import prepared_data

    slices = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[40:64]
    for i, src in enumerate(slices):
        ds = pydicom.dcmread(src)
        ds.PatientID = f"P{i:03d}"
        out = tmp_path / "ds" / ("normal" if i % 2 else "nodule") / f"{i:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    cfg = config_from_dict({"name": "bp", "output_dir": str(tmp_path / "runs"),
                            "data": {"source": "folder", "path": str(tmp_path / "ds"), "size": 28,
                                     "window": "lung"}})
    data = prepared_data(cfg.data)
    prof = profile_of(data, cfg.data)
    assert prof is not None and prof.modality == "CT" and prof.body_part == "CHEST"
    x = data.train.batch(np.arange(1))[0].numpy()[0]
    assert check_input(prof, x, "CT", False, (512, 512), "CHEST") == []
    assert check_input(prof, x, "CT", False, (512, 512), "HEAD") == [
        "body part HEAD but the model was trained on CHEST images"]
