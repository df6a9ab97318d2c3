"""The medlens command line, run as a user would (subprocess), on real data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def medlens(*args, cwd=None, check=False):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "medlens.cli.main", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"medlens {args} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


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
    r = medlens("evaluate", run, "--split", "val", check=True)
    assert "val (n=300)" in r.stdout
    # predict real X-ray PNG files
    from medlens.data.medmnist import load_medmnist

    test = load_medmnist("pneumoniamnist").test
    files = []
    for i in range(3):
        f = tmp_path / f"xray{i}.png"
        Image.fromarray(test.images[i, 0]).save(f)
        files.append(f)
    r = medlens("predict", run, *files, check=True)
    assert all(f.name in r.stdout for f in files) and ("pneumonia" in r.stdout or "normal" in r.stdout)
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
