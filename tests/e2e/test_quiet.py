"""The console carries medlens's own lines only: no third-party chatter from real `medlens train` and
`medlens federate` processes (Lightning tips, Flower deprecations and log lines, raw ANSI colour codes when
the output is not a terminal, warnings printed from Ray's worker processes). The server and site processes of
`medlens federate server/client` are checked where they already run: tests/integration/test_federated.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes import assert_no_federate_chatter

REPO = Path(__file__).resolve().parents[2]
CHATTER = ("Tip:", "litlogger", "GPU available", "TPU available", "Automatic Mixed Precision",
           "Loading `train_dataloader`", "`Trainer.fit` stopped")


def _medlens() -> str:
    return str(Path(sys.executable).with_name("medlens"))


@pytest.mark.integration
def test_train_quiet_prints_no_library_chatter(tmp_path, data_root):
    r = subprocess.run([_medlens(), "train", str(REPO / "configs" / "pneumoniamnist_cnn.yaml"), "--quiet",
                        "--set", "train.epochs=1", "--set", "data.max_samples=120", "--set", "train.precision=bf16-mixed",
                        "--set", f"output_dir={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MEDLENS_DATA": str(data_root)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pneumoniamnist_cnn" / "run.json").exists()
    found = [c for c in CHATTER if c in r.stderr or c in r.stdout]
    assert not found, f"library chatter on the console: {found}\n{r.stderr}"


@pytest.mark.integration
@pytest.mark.slow
def test_federate_simulation_prints_no_library_chatter(tmp_path, data_root):
    r = subprocess.run([_medlens(), "federate", str(REPO / "configs" / "pneumoniamnist_cnn.yaml"),
                        "--set", "data.max_samples=100", "--set", f"output_dir={tmp_path}", "--sites", "2",
                        "--rounds", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MEDLENS_DATA": str(data_root)})
    assert r.returncode == 0, r.stderr[-4000:]
    # medlens's own lines stay
    assert "round 1: 2 site(s) fitted" in r.stdout and "test AUC" in r.stdout, r.stdout
    assert (tmp_path / "pneumoniamnist_cnn" / "federated.json").exists()
    assert_no_federate_chatter(r.stdout + r.stderr)
