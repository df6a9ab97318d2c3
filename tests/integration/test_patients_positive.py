"""Issue 26, deliver 1 and 2: patients from the data (DICOM PatientID, data.patient_pattern), a split called
patient-level only when they are known, and an explicit positive class (conventional negative names, else a
one-line refusal); predict's columns name the predicted and the positive class."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.uid import generate_uid

from clirun import medlens
from interop_checks import dciodvfy
from medlens.config import config_from_dict
from medlens.data.labels import is_negative_name, negative_first
from medlens.data.splits import PER_IMAGE
from medlens.errors import ConfigError
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.train import train
from conftest import QUICK_EXPLAIN

N_PATIENTS, SLICES = 30, 4


def _slices(data_root: Path) -> list[Path]:
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))
    assert len(files) >= N_PATIENTS * SLICES
    return files[:N_PATIENTS * SLICES]


def _dicom_folder(data_root: Path, root: Path) -> dict[str, str]:
    """30 patients x 4 real LIDC CT slices (downsampled to 64x64), one PatientID per 4 slices, the class
    (disc / normal) by patient: ``{file path: PatientID}``."""
    owner = {}
    for i, f in enumerate(_slices(data_root)):
        k = i // SLICES
        ds = pydicom.dcmread(f)
        small = ds.pixel_array[::8, ::8].copy()
        ds.PixelData, ds.Rows, ds.Columns = small.tobytes(), small.shape[0], small.shape[1]
        ds.PixelSpacing = [float(v) * 8 for v in ds.PixelSpacing]
        ds.PatientID, ds.PatientName = f"LIDC-TEST-{k:02d}", f"Test^{k:02d}"
        if i % SLICES == 0:
            study = generate_uid()
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out = root / ("disc" if k % 2 else "normal") / f"s{i:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
        owner[str(out)] = ds.PatientID
    return owner


def _png_folder(data_root: Path, root: Path) -> None:
    """The same slices as 8-bit PNGs (lung window): nothing tells the patients apart."""
    for i, f in enumerate(_slices(data_root)):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array[::8, ::8] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        png = (np.clip((hu + 1350) / 1500, 0, 1) * 255).astype(np.uint8)
        out = root / ("disc" if (i // SLICES) % 2 else "normal") / f"s{i:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(out)


def _config(tmp: Path, name: str, path: Path, **data) -> dict:
    return {"name": name, "seed": 0, "output_dir": str(tmp / "runs"),
            "data": {"source": "folder", "path": str(path), "size": 28, "val_fraction": 0.2,
                     "test_fraction": 0.2, **data},
            "model": {"name": "small_cnn", "params": {"widths": [4, 8]}},
            "train": {"epochs": 1, "batch_size": 32, "precision": "32"},
            "evaluation": {"bootstrap": 10}, "explain": QUICK_EXPLAIN}


def test_dicom_folder_split_by_patient_disc_positive_and_predict_columns(tmp_path, data_root):
    root = tmp_path / "dicom"
    owner = _dicom_folder(data_root, root)
    cfg = tmp_path / "dicom.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, "Lung slices by patient", root)))
    res = medlens("train", cfg, "--quiet", env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert PER_IMAGE not in res.stdout
    run = tmp_path / "runs" / "Lung slices by patient"
    meta = json.loads((run / "run.json").read_text())
    assert meta["patients_known"] is True and "patient-level" in meta["split_method"]
    assert PER_IMAGE not in meta["split_method"]
    # "disc" is positive without data.positive_class: "normal" is a conventional negative name
    assert meta["class_names"] == ["normal", "disc"] and meta["positive_class"] == "disc"
    # no patient crosses splits: the PatientIDs we wrote, looked up by file (the run's split, rebuilt)
    data = prepared_data(config_from_dict(yaml.safe_load(cfg.read_text())).data, seed=0)
    split_of: dict[str, set] = {}
    for split in ("train", "val", "test"):
        for src in data.get(split).sources:
            split_of.setdefault(owner[str(src)], set()).add(split)
    assert len(split_of) == N_PATIENTS and all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}
    preds = pd.read_csv(run / "predictions.csv")  # the run's own record agrees
    for src, split in zip(preds["source"], preds["split"]):
        assert split_of[owner[str(src)]] == {split}
    # the hashed ids group the same files as the PatientIDs, and no PatientID is written in the clear
    assert preds.groupby("patient_id")["source"].apply(lambda s: len({owner[str(x)] for x in s})).eq(1).all()
    assert preds["patient_id"].nunique() == len({owner[str(x)] for x in preds["source"]})
    for f in ("run.json", "predictions.csv", "report.html", "metrics.json"):
        assert "LIDC-TEST" not in (run / f).read_text()
    report = (run / "report.html").read_text()
    assert "no patient appears in more than one split" in report and PER_IMAGE not in report
    assert "<title>medlens report: Lung slices by patient</title>" in report  # the config's name
    assert 'id="positive-class">disc<' in report
    # predict: the predicted class, P(predicted class) and P(disc)
    files = sorted(root.rglob("*.dcm"))[:3]
    out = medlens("predict", run, *files, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr[-2000:]
    header = next(line for line in out.stdout.splitlines() if "predicted class" in line)
    assert "P(predicted class)" in header and "P(disc)" in header and "P(normal)" not in header
    row = next(line for line in out.stdout.splitlines() if files[0].name in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    p_pred, p_disc = float(cells[2]), float(cells[3])
    th = meta["threshold"]["value"]
    assert abs(p_disc - th) < 2e-3 or (cells[1] == "disc") == (p_disc > th)  # decided at the threshold (3 digits)
    # the SR and the FHIR Bundle name the positive class (an algorithm parameter -> a Device property)
    res = medlens("predict", run, files[0], "--out", tmp_path / "sr", "--outputs", "sr,fhir")
    assert res.returncode == 0, res.stderr[-2000:]
    sr_file, = (tmp_path / "sr").glob("*_sr.dcm")
    dciodvfy(sr_file)
    texts = [str(e.value) for e in pydicom.dcmread(sr_file).iterall() if e.keyword == "TextValue"]
    assert "positive class disc" in texts
    fhir, = (tmp_path / "sr").glob("*_fhir.json")
    assert "positive class disc" in fhir.read_text()
    assert p_pred == pytest.approx(p_disc if cells[1] == "disc" else 1 - p_disc, abs=2e-3)


def test_png_folder_per_image_split_warns(tmp_path, data_root):
    root = tmp_path / "png"
    _png_folder(data_root, root)
    cfg = tmp_path / "png.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, "pngs", root)))
    res = medlens("train", cfg, "--quiet", env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"warning: {PER_IMAGE}" in res.stdout  # the console
    run = tmp_path / "runs" / "pngs"
    meta = json.loads((run / "run.json").read_text())
    assert meta["patients_known"] is False and PER_IMAGE in meta["split_method"]
    assert "patient-level" not in meta["split_method"]
    report = (run / "report.html").read_text()
    assert 'id="per-image"' in report and PER_IMAGE in report
    assert "no patient appears in more than one split" not in report


def test_patient_pattern_groups_files(tmp_path, data_root):
    root = tmp_path / "png"
    _png_folder(data_root, root)
    for f in root.rglob("*.png"):  # s007.png -> pat01_s007.png: the patient in the name
        f.rename(f.with_name(f"pat{int(f.stem[1:]) // SLICES:02d}_{f.name}"))
    cfg = config_from_dict(_config(tmp_path, "pattern", root, patient_pattern=r"/pat(\d+)_"))
    data = prepared_data(cfg.data, seed=0)
    assert data.patients_known is True and "patient-level" in data.split_method
    pid = {s: set(map(str, data.get(s).patient_ids)) for s in ("train", "val", "test")}
    assert len(pid["train"] | pid["val"] | pid["test"]) == N_PATIENTS
    assert not (pid["train"] & pid["val"]) and not (pid["train"] & pid["test"]) and not (pid["val"] & pid["test"])
    bad = config_from_dict(_config(tmp_path, "pattern", root, patient_pattern=r"/patient(\d+)_"))
    with pytest.raises(Exception, match="does not match data.patient_pattern"):
        prepared_data(bad.data, seed=0)


def test_two_unconventional_classes_refuse_in_one_line(tmp_path, data_root):
    rng = np.random.default_rng(0)
    root = tmp_path / "ab"
    for k in range(24):
        (root / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(root / "ab"[k % 2] / f"{k:02d}.png")
    cfg = config_from_dict(_config(tmp_path, "ab", root, size=16))
    with pytest.raises(ConfigError) as e:
        train(cfg, progress_bar=False, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "data.positive_class" in msg and "'a'" in msg and "'b'" in msg
    assert not (tmp_path / "runs" / "ab" / "run.json").exists() or \
        json.loads((tmp_path / "runs" / "ab" / "run.json").read_text())["status"] != "complete"
    # naming it decides: the named class is index 1
    named = prepared_data(config_from_dict(_config(tmp_path, "ab", root, size=16, positive_class="a")).data)
    assert named.class_names == ["b", "a"] and named.positive_class == "a" and not named.needs_positive


def test_conventional_negative_names():
    for n in ("normal", "Negative", "BENIGN", "healthy", "Control", "no_finding", "No DR", "0"):
        assert is_negative_name(n)
    for n in ("disc", "pneumonia", "a", "nodule", "notable"):
        assert not is_negative_name(n)
    assert negative_first(["disc", "normal"]) == (["normal", "disc"], True)
    assert negative_first(["benign", "malignant"]) == (["benign", "malignant"], True)
    assert negative_first(["a", "b"]) == (["a", "b"], False)
    assert negative_first(["normal", "healthy"]) == (["normal", "healthy"], False)
    assert negative_first(["x", "y", "z"]) == (["x", "y", "z"], True)


def test_report_captions_give_the_probability_of_the_predicted_class(trained_run):
    # "true pneumonia, predicted normal (p=0.74)" quoted P(pneumonia) beside the class normal
    import re

    meta = json.loads((trained_run / "run.json").read_text())
    names, positive = meta["class_names"], meta["positive_class"]
    assert positive == names[1] == "pneumonia"
    preds = pd.read_csv(trained_run / "predictions.csv")
    prob = {int(i): p for i, p in zip(preds.loc[preds["split"] == "test", "index"],
                                      preds.loc[preds["split"] == "test", "prob"])}
    section = json.loads((trained_run / "report_sections" / "explanations.json").read_text())["data"]
    seen = set()
    for group in section["groups"]:
        for case in group["cases"]:
            m = re.match(r"#(\d+): true (\w+), predicted (\w+) \(p=([0-9.]+)\)", case["caption"])
            assert m, case["caption"]
            i, predicted, p = int(m[1]), m[3], float(m[4])
            want = prob[i] if predicted == positive else 1 - prob[i]
            assert p == pytest.approx(want, abs=0.006), case["caption"]
            seen.add(predicted)
    assert seen == {"normal", "pneumonia"}  # false negatives (predicted normal) are among the cases


def test_csv_manifest_of_dicom_files_takes_patients_from_the_headers(tmp_path, data_root):
    owner = _dicom_folder(data_root, tmp_path / "dicom")
    rows = [{"path": str(Path(f).relative_to(tmp_path)), "label": Path(f).parent.name} for f in owner]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)  # no patient column
    cfg = config_from_dict(_config(tmp_path, "csv", tmp_path / "m.csv", source="csv"))
    data = prepared_data(cfg.data, seed=0)
    assert data.patients_known is True and "patient-level" in data.split_method
    assert data.class_names == ["normal", "disc"] and data.positive_class == "disc"
    split_of: dict[str, set] = {}
    for split in ("train", "val", "test"):
        d = data.get(split)
        assert not any("LIDC-TEST" in str(p) for p in d.patient_ids)  # hashed
        for src in d.sources:
            split_of.setdefault(owner[str(src)], set()).add(split)
    assert len(split_of) == N_PATIENTS and all(len(s) == 1 for s in split_of.values())
    # the same manifest of PNGs: nothing names the patients
    _png_folder(data_root, tmp_path / "png")
    pd.DataFrame([{"path": str(f.relative_to(tmp_path)), "label": f.parent.name}
                  for f in sorted((tmp_path / "png").rglob("*.png"))]).to_csv(tmp_path / "p.csv", index=False)
    png = prepared_data(config_from_dict(_config(tmp_path, "csv", tmp_path / "p.csv", source="csv")).data, seed=0)
    assert png.patients_known is False and PER_IMAGE in png.split_method
