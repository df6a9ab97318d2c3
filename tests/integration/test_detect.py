"""Whole-scan nodule detection on the real LIDC-IDRI-0001 CT, with a patch classifier that never saw that scan
(trained for one epoch on LIDC-IDRI-0002: its 2-reader nodule, which LUNA16 excludes, and random lung points)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medlens.errors import DataError
from clirun import medlens
from interop_checks import dciodvfy

UID1 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@pytest.fixture(scope="module")
def run_0002(data_root, tmp_path_factory):
    """The seed CNN trained 1 epoch on a store of LIDC-IDRI-0002 only (test patient: none of 0001's patches)."""
    from medlens.config import load_config
    from medlens.data.lidc import cluster_nodules, parse_lidc_xml
    from medlens.io import load
    from medlens.workflow.nodules import extract_patches
    from medlens.workflow.train import train

    tmp = tmp_path_factory.mktemp("det")
    scan = data_root / "lidc-idri-0002"
    img = load(scan)
    big = max(cluster_nodules(parse_lidc_xml(next(scan.rglob("*.xml"))), img), key=lambda p: p.diameter_mm)
    assert big.diameter_mm > 20 and big.n_readers == 2  # the nodule LUNA16 excludes (2 of 4 readers)
    pd.DataFrame([{"seriesuid": img.meta["series_uid"], "coordX": big.centroid_world[0], "coordY": big.centroid_world[1],
                   "coordZ": big.centroid_world[2], "diameter_mm": big.diameter_mm}]).to_csv(tmp / "a.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_patches([scan], tmp / "a.csv", tmp / "s.h5", neg_ratio=12, seed=0)
        repo = Path(__file__).resolve().parents[2]
        cfg = load_config(repo / "configs" / "luna16_seed_cnn.yaml",
                          [f"data.path={tmp / 's.h5'}", f"output_dir={tmp}", "train.epochs=1", "evaluation.bootstrap=10",
                           # the report names its method: the search over methods is not what this test reads
                           "explain.method=gradcam", "explain.score_images=4",
                           "data.test_patient=null", "data.val_fraction=0.3", "data.test_fraction=0.3"])
        return train(cfg, progress_bar=False)


@pytest.mark.slow
def test_detect_finds_the_nodule_of_0001(data_root, run_0002, tmp_path):
    from medlens.report.dicom_sr import read_tid1500
    from medlens.workflow.detect import detect_scans

    luna = data_root / "luna16"
    out = tmp_path / "det"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = detect_scans([data_root / "lidc-idri-0001"], out, run_0002, annotations=luna / "annotations.csv",
                           excluded=luna / "luna16_official_csv" / "annotations_excluded.csv", n_boot=20,
                           gallery_size=4, max_findings=3)
    (d,) = rep.scans
    assert d.seriesuid == UID1 and d.seconds > 0   # the time per scan is measured by the benchmark, not asserted
    c = pd.read_csv(out / "candidates.csv")
    assert list(c.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"] and len(c) > 10
    assert c.probability.between(0, 1).all()
    nod = pd.read_csv(luna / "annotations.csv").iloc[0]  # (56.21, 86.34, -115.87) mm, 23.35 mm
    dist = np.linalg.norm(c[["coordX", "coordY", "coordZ"]].to_numpy() - [nod.coordX, nod.coordY, nod.coordZ], axis=1)
    assert dist.min() < nod.diameter_mm / 2  # a candidate within the nodule's radius
    assert rep.froc.n_nodules == 1 and rep.froc.scans[0].hits_per_nodule[0] >= 1
    assert np.isfinite(rep.froc.scans[0].nodule_scores[0])
    assert len(rep.froc.operating_points) == 7 and (out / "froc.png").is_file()
    # the probabilities are the run's Predictor on the store's own patch extractor
    from medlens.data.nodules import extract_patch_2d
    from medlens.io import load
    from medlens.run.predictor import Predictor
    from medlens.run.run import Run

    img = load(data_root / "lidc-idri-0001")
    pred = Predictor(Run.open(run_0002))
    row = c.iloc[0]
    x = pred.prepare(extract_patch_2d(img, (row.coordX, row.coordY, row.coordZ), 50))
    assert float(pred.predict_arrays(x[None])[0]) == pytest.approx(row.probability, abs=1e-5)
    # SR: one planar ROI group per strongest candidate, valid for dciodvfy, the source series referenced
    dciodvfy(d.sr)
    ds = pydicom.dcmread(d.sr)
    assert ds.StudyInstanceUID == pydicom.dcmread(next((data_root / "lidc-idri-0001").rglob("*.dcm")),
                                                  stop_before_pixels=True).StudyInstanceUID
    groups = read_tid1500(d.sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == 3  # the 3 strongest candidates
    html = (out / "gallery" / "index.html").read_text()
    assert "pipeline check, not a detection result" in html and "<script" not in html
    assert len(list((out / "gallery").glob("candidate_*.png"))) == 4
    summary = json.loads((out / "detections.json").read_text())
    assert summary["scans"][0]["candidates"] == len(c)


def test_non_ct_volume_is_refused(data_root, tmp_path):
    from medlens.workflow.detect import detect_scans

    mri = data_root / "mri-seg" / "brain1_image.nrrd"
    with pytest.raises(DataError, match="not CT Hounsfield units|not modality") as e:
        detect_scans([mri], tmp_path / "x")
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_froc_cli_missing_columns_one_line(tmp_path, data_root):
    bad = tmp_path / "c.csv"
    bad.write_text("seriesuid,coordX,coordY\n1.2,0,0\n")
    r = medlens("nodules", "froc", bad, data_root / "luna16" / "annotations.csv")
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, lines
    assert "lacks the column(s) ['coordZ', 'probability']" in lines[0] and str(bad) in lines[0]


def test_non_empty_out_is_refused_before_any_scan_is_read(tmp_path):
    """The output folder is checked first: a scan that does not exist is never reached (the candidate search of a
    real scan would take a minute before the same refusal)."""
    from medlens.errors import MedlensError
    from medlens.workflow.detect import detect_scans

    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("earlier results")
    with pytest.raises(MedlensError, match="output folder exists and is not empty") as e:
        detect_scans([tmp_path / "no-such-scan.mhd"], out)
    assert "\n" not in str(e.value) and (out / "kept.txt").read_text() == "earlier results"
