"""report.html rendered by real headless Chromium."""

import shutil
import subprocess

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(*args, tmp_path):
    assert CHROMIUM, "chromium not installed (make test installs Debian's chromium package)"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(trained_run, tmp_path):
    report = trained_run / "report.html"
    dom = _chromium("--dump-dom", report.as_uri(), tmp_path=tmp_path).stdout
    assert 'id="metrics"' in dom and "sensitivity" in dom and "chosen on the validation split" in dom
    assert dom.count("data:image/png;base64,") >= 3
    # the clinical-rigor sections render: calibration table and reliability diagram, net benefit, shift,
    # model card and the checklist rows
    for anchor in ('id="calibration"', 'id="decision-curve"', 'id="shift"', 'id="model-card"', 'id="checklist"'):
        assert anchor in dom
    assert 'alt="Reliability diagram"' in dom and 'alt="Decision curve"' in dom
    assert dom.count("not available from the run") >= 10 and "TRIPOD+AI" in dom
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri(), tmp_path=tmp_path)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    # a rendered page with text, tables and plots: far from blank
    assert img.shape[0] >= 2000 and img.std() > 20 and (img < 128).mean() > 0.01
