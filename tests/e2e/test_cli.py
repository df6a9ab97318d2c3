"""The medlens command line, run as a user would (in-process through the entry point; one test runs the\ninstalled script as a process), on real data."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


from clirun import medlens  # in-process: the console script's entry point, without 3-10 s of imports per call


def test_console_script_runs_as_a_process(tmp_path):
    """The installed ``medlens`` script in a real process: exit codes and one-line errors on stderr."""
    exe = Path(sys.executable).parent / "medlens"
    r = subprocess.run([str(exe), "models", "list"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "luna16_nodule_cnn" in r.stdout
    r = subprocess.run([str(exe), "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing.yaml" in lines[0] and "not found" in lines[0]


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_doctor_and_lists(data_root):
    r = medlens("doctor", check=True)
    assert "torch" in r.stdout and "medmnist/pneumoniamnist" in r.stdout
    r = medlens("models", "list", check=True)
    assert "luna16_nodule_cnn" in r.stdout and "resnet18" in r.stdout
    r = medlens("data", "list", check=True)
    assert "chestmnist" in r.stdout and "multilabel" in r.stdout
    r = medlens("data", "info", "pneumoniamnist", check=True)
    assert "verified" in r.stdout and "4708" in r.stdout


PNEUMONIA_CLASSES = {0: "normal", 1: "pneumonia"}  # MedMNIST's label dictionary for PneumoniaMNIST


def _confident_correct_test_cases(run: Path) -> dict[int, int]:
    """{label: index in the official test split} of the most confident correct test prediction of each class,
    from the run's predictions.csv (written by evaluation, not by `medlens predict`). A one-epoch model is
    barely calibrated, so the margin to the threshold only has to exceed float noise: `medlens predict`
    sees the same pixels (lossless PNG) and must reach the same, correct, decision."""
    import pandas as pd

    p = pd.read_csv(run / "predictions.csv")
    p = p[(p["split"] == "test") & (p["label"] == p["pred"])]
    thr = json.loads((run / "metrics.json").read_text())["threshold"]["value"]
    picks = {0: p[p["label"] == 0].nsmallest(1, "prob"), 1: p[p["label"] == 1].nlargest(1, "prob")}
    out = {}
    for label, row in picks.items():
        assert len(row) == 1 and abs(float(row["prob"].iloc[0]) - thr) > 1e-4, f"no correct class {label}"
        out[label] = int(re.search(r"test\[(\d+)\]$", row["source"].iloc[0]).group(1))
    return out


def _predicted_class(stdout: str, name: str) -> str:
    """The 'prediction' cell of the table row of file ``name``."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if name in cells:
            return cells[cells.index(name) + 1]
    raise AssertionError(f"no row for {name} in:\n{stdout}")


def test_train_evaluate_predict_report(tmp_path, data_root):
    cfg = yaml.safe_load((REPO / "configs" / "pneumoniamnist_cnn.yaml").read_text())
    cfg.update(name="cli", output_dir=str(tmp_path))
    cfg["data"]["max_samples"] = 300
    cfg["train"].update(epochs=1)
    cfg["evaluation"]["bootstrap"] = 50
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = medlens("train", tmp_path / "c.yaml", "--quiet", check=True)
    assert "AUC" in r.stdout and "report.html" in r.stdout
    run = tmp_path / "cli"
    cases = _confident_correct_test_cases(run)
    r = medlens("evaluate", run, "--split", "val", check=True)
    assert "val (n=300)" in r.stdout
    # predict real X-ray PNG files, read straight from the official npz, whose true class is known
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as npz:
        images, labels = npz["test_images"], npz["test_labels"][:, 0]
    files = {}
    for label, i in cases.items():
        assert labels[i] == label
        f = tmp_path / f"xray{i}.png"
        Image.fromarray(images[i]).save(f)
        files[f] = PNEUMONIA_CLASSES[label]
    r = medlens("predict", run, *files, check=True)
    for f, truth in files.items():
        assert _predicted_class(r.stdout, f.name) == truth, r.stdout
    r = medlens("report", run, check=True)
    assert (run / "report.html").stat().st_size > 10_000
    # training again into the same folder is refused, not overwritten
    r = medlens("train", tmp_path / "c.yaml")
    _one_line_error(r, "already exists")


def test_errors_are_one_line(tmp_path, data_root):
    _one_line_error(medlens("train", tmp_path / "missing.yaml"), "missing.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: pneumoniamnist}\ntrain: {epoch: 3}\n")
    _one_line_error(medlens("train", bad), "bad.yaml", "unknown key 'train.epoch'", "train.epochs")
    _one_line_error(medlens("evaluate", tmp_path), "no run.json")
    _one_line_error(medlens("data", "fetch", "nosuchmnist"), "unknown MedMNIST dataset")
    corrupt = tmp_path / "c.npz"
    corrupt.write_bytes(b"PK\x03\x04garbage")
    cfg = tmp_path / "corrupt.yaml"
    cfg.write_text(f"data: {{name: pneumoniamnist, path: {corrupt}}}\noutput_dir: {tmp_path}\n")
    _one_line_error(medlens("train", cfg), "c.npz", "not a readable .npz")
    r = medlens("--debug", "train", bad)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_predict_rejects_wrong_shape(trained_run, tmp_path):
    vol = tmp_path / "vol.npy"
    np.save(vol, np.zeros((4, 5, 6, 7), np.float32))
    _one_line_error(medlens("predict", trained_run, vol), "vol.npy")
    _one_line_error(medlens("predict", trained_run, tmp_path / "nope.png"), "nope.png", "not found")
