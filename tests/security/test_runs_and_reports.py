"""Run folders and reports as an attacker or a careless user would treat them (issue: security).

Real runs on real PneumoniaMNIST images, real headless Chromium. The CLI runs in a subprocess (``medlens``)
where the process itself is the point: a file that could run code when loaded, a lock held by another process,
a kill mid-epoch. Elsewhere it runs in this process (``inproc``, tests/clirun.py): the same entry point, exit
code and output, without paying the library's imports again for each command.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from clirun import medlens as inproc
from skops_gadget import GADGET, forge
from conftest import QUICK_EXPLAIN

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=document.body.setAttribute('data-pwned','1')>"


def medlens(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "medlens.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout[-500:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def tiny(tmp: Path, name: str, **over) -> Path:
    d = {"name": name, "seed": 0, "output_dir": str(tmp / "runs"),
         "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 200},
         "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
         "train": {"epochs": 1, "batch_size": 64, "precision": "32"}, "evaluation": {"bootstrap": 20},
         "explain": QUICK_EXPLAIN}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def xray_png(data_root: Path, path: Path, i: int = 0) -> Path:
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(d["test_images"][i]).save(path)
    return path


def test_forged_skops_model_runs_no_code(tmp_path, data_root):
    cfg = tiny(tmp_path, "rf", model={"name": "random_forest", "params": {"n_estimators": 5}})
    r = inproc("train", cfg, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "runs" / "rf"
    png = xray_png(data_root, tmp_path / "x.png")
    assert inproc("predict", run, png).returncode == 0  # the genuine file loads
    sentinel = tmp_path / "code_ran.txt"
    forge(run / "model.skops", sentinel)
    for args in (("predict", run, png), ("evaluate", run)):
        r = inproc(*args)   # a gadget that ran would write the sentinel from this process as from any other
        one_line_error(r, "model.skops", GADGET)
        assert not sentinel.exists(), f"{args[0]} executed code from the model file"


def test_overwrite_deletes_only_run_folders_and_names_stay_inside(tmp_path, data_root):
    victim = tmp_path / "runs" / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    cfg = tiny(tmp_path, "ok")
    one_line_error(inproc("train", cfg, "--set", "name=victim", "--overwrite"), "not a medlens run")
    assert (victim / "precious.txt").read_text() == "keep me"
    sibling = tmp_path / "runs" / "ok_sibling"
    sibling.mkdir()
    (sibling / "x").write_text("x")
    for bad in ("../victim", ".", "..", "a/b", ""):
        r = inproc("train", cfg, "--set", f"name={bad}", "--overwrite")
        assert r.returncode != 0 and "name" in r.stderr, (bad, r.stderr[-500:])
    assert (victim / "precious.txt").exists() and (sibling / "x").exists()


def test_second_writer_is_refused_while_a_run_is_locked(tmp_path, data_root):
    from medlens.run import run_lock

    cfg = tiny(tmp_path, "locked")
    run = tmp_path / "runs" / "locked"
    with run_lock(run):  # a real fcntl lock held by this process; the CLI is another process
        one_line_error(medlens("train", cfg), "another medlens process")
    assert not (run / "config.yaml").exists()


def test_killed_in_epoch_zero_evaluate_and_resume_agree(tmp_path, data_root):
    import signal
    import time

    cfg_path = tiny(tmp_path, "killed", data={"max_samples": 4000}, train={"epochs": 3, "batch_size": 8})
    run = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", "train", str(cfg_path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.time() + 240
        while not (run / "run.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)  # inside the first epoch (500 small batches)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (run / "checkpoints" / "last.ckpt").exists() and not (run / "model.pt").exists()
    one_line_error(inproc("evaluate", run), "--resume")
    r = inproc("train", cfg_path, "--resume", "--quiet", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "starts again from epoch 0" in r.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def _dom(report: Path, tmp_path: Path) -> str:
    assert CHROMIUM, "chromium not installed (make test installs Debian's chromium package)"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                        "--virtual-time-budget=3000", "--dump-dom", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    return r.stdout


def _elements(dom: str) -> list[tuple[str, dict]]:
    """Every element Chromium built (tag, attributes), parsed from its serialised DOM."""
    from html.parser import HTMLParser

    found = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, dict(attrs)))

    P().feed(dom)
    return found


def _assert_no_injection(dom: str) -> None:
    els = _elements(dom)
    assert any(a.get("id") == "metrics" for _, a in els)  # the page rendered
    assert not any("data-pwned" in a for _, a in els)  # no onerror handler ran
    assert not any(t == "img" and (a.get("src") == "x" or a.get("id") == "injected") for t, a in els)
    assert not any(t == "script" for t, _ in els) and not any(a.get("id") == "injected" for _, a in els)
    assert not any(k.startswith("on") for _, a in els for k in a)  # no event-handler attribute anywhere
    assert "&lt;img src=x onerror=" in dom  # the hostile name is shown, as text


def test_hostile_class_names_and_sections_inject_nothing(tmp_path, data_root):
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    imgs, labels = d["train_images"][:160], d["train_labels"][:160, 0]
    root = tmp_path / "folder"
    rows = []
    for i, (im, y) in enumerate(zip(imgs, labels)):
        cls = HOSTILE if y else "normal"
        p = root / cls / f"p{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
        rows.append({"path": str(p.relative_to(root)), "label": cls, "patient_id": f"p{i}"})
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    for name, data in (("folder_run", {"source": "folder", "path": str(root), "size": 28}),
                       ("csv_run", {"source": "csv", "path": str(manifest), "image_root": str(root), "size": 28})):
        cfg = tiny(tmp_path, name, data=data)
        cfg_d = yaml.safe_load(cfg.read_text())
        cfg_d["data"].pop("name")
        cfg.write_text(yaml.safe_dump(cfg_d))
        r = inproc("train", cfg, "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        run = tmp_path / "runs" / name
        assert HOSTILE in json.loads((run / "run.json").read_text())["class_names"]
        _assert_no_injection(_dom(run / "report.html", tmp_path))
    # hand-dropped section files: an old-style raw-HTML one and a data one with markup in every string
    sections = run / "report_sections"
    (sections / "zz_raw.json").write_text(json.dumps({"title": "<script>alert(1)</script>",
                                                      "html": '<img id="injected" src=x onerror=alert(1)>'}))
    ex = json.loads((sections / "explanations.json").read_text())
    ex["title"] = HOSTILE
    ex["data"]["method"] = '<img id="injected" src=x>'
    ex["data"]["groups"] = [{"title": HOSTILE, "cases": [{"caption": HOSTILE, "png": '" onerror="alert(1)'}]}]
    (sections / "explanations.json").write_text(json.dumps(ex))
    r = inproc("report", run)
    assert r.returncode == 0 and "zz_raw.json (not a medlens section)" in r.stderr, r.stderr[-1000:]
    dom = _dom(run / "report.html", tmp_path)
    _assert_no_injection(dom)
    assert '&lt;img id="injected" src=x&gt;' in dom  # the hand-edited method name, shown as text


class _Gadget:
    """Pickles to a call that writes a file: what a malicious checkpoint would carry."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_torch_files_load_weights_only_including_lightning_resume(tmp_path, trained_run, data_root):
    import ast

    import torch

    # every torch.load in the package says weights_only=True, and so does Lightning's resume call
    src = REPO / "src" / "medlens"
    for py in src.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("load", "fit") and \
                    getattr(getattr(node.func, "value", None), "id", "") in ("torch", "trainer"):
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{py.relative_to(REPO)}:{node.lineno}"
    # and behaviourally: a pickled gadget as model.pt or as the resume checkpoint runs nothing
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": _Gadget(str(sentinel))}, run / "model.pt")
    png = xray_png(data_root, tmp_path / "x.png")
    one_line_error(inproc("predict", run, png), "model.pt", "cannot load weights")
    assert not sentinel.exists()
    (run / "model.pt").unlink()
    torch.save({"state_dict": _Gadget(str(sentinel))}, run / "checkpoints" / "last.ckpt")
    meta = json.loads((run / "run.json").read_text())
    meta["status"] = "training"
    (run / "run.json").write_text(json.dumps(meta))
    r = inproc("train", run / "config.yaml", "--resume", "--run-dir", run, "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not sentinel.exists()


def test_non_finite_inputs_are_refused_with_the_file_name(tmp_path, trained_run):
    a = np.random.default_rng(0).random((28, 28)).astype(np.float32)
    a[3:6, 3:6] = np.nan
    bad = tmp_path / "nan_patch.npy"
    np.save(bad, a)
    one_line_error(inproc("predict", trained_run, bad), "nan_patch.npy", "NaN or infinite")
    a[3:6, 3:6] = 0.5
    a[10, 10] = np.inf
    np.save(tmp_path / "inf_patch.npy", a)
    one_line_error(inproc("predict", trained_run, tmp_path / "inf_patch.npy"), "inf_patch.npy")


def test_same_stem_inputs_get_distinct_explanations(tmp_path, trained_run, data_root):
    a = xray_png(data_root, tmp_path / "a" / "x.png", 0)
    b = xray_png(data_root, tmp_path / "b" / "x.png", 5)
    out = tmp_path / "maps"
    r = inproc("explain", trained_run, a, b, "--out", out)
    assert r.returncode == 0, r.stderr[-1500:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["x-2_gradcam.png", "x_gradcam.png"]
    assert not np.array_equal(np.load(out / "x_gradcam.npy"), np.load(out / "x-2_gradcam.npy"))
