"""The console carries medlens's own lines only: no third-party chatter from a real `medlens train` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHATTER = ("Tip:", "litlogger", "GPU available", "TPU available", "Automatic Mixed Precision",
           "Loading `train_dataloader`", "`Trainer.fit` stopped")


@pytest.mark.integration
def test_train_quiet_prints_no_library_chatter(tmp_path, data_root):
    medlens = Path(sys.executable).with_name("medlens")
    r = subprocess.run([str(medlens), "train", str(REPO / "configs" / "pneumoniamnist_cnn.yaml"), "--quiet",
                        "--set", "train.epochs=1", "--set", "data.max_samples=120", "--set", "train.precision=bf16-mixed",
                        "--set", f"output_dir={tmp_path}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MEDLENS_DATA": str(data_root)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pneumoniamnist_cnn" / "run.json").exists()
    found = [c for c in CHATTER if c in r.stderr or c in r.stdout]
    assert not found, f"library chatter on the console: {found}\n{r.stderr}"
