"""The same plan twice (issue 30, item 4): the same data, budget and seed give byte-identical plans on the same
machine, also when the machine is loaded by a busy process during the second call; the plan records the machine;
the figures come from this machine's stored measurements (machine.json), which are validated when read; a changed
budget still changes the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clirun import medlens


def _file(tmp_path: Path, n=(200, 60, 60), pos=(60, 18, 18)) -> Path:
    """A small binary MedMNIST-format file: black images with a bright centre square, labels by count."""
    arrays = {}
    for s, k, p in zip(("train", "val", "test"), n, pos):
        x = np.zeros((k, 28, 28), np.uint8)
        x[:, 7:21, 7:21] = 200
        y = np.zeros((k, 1), np.uint8)
        y[:p] = 1
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    path = tmp_path / "stable.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh machine-figures folder for each test (the first plan measures)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MEDLENS_CACHE", str(root))
    return root


def _plan(data: Path, out: Path, budget: str = "2m", *extra: str):
    r = medlens("plan", data, "--budget", budget, "--out", out, "--seed", "1", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _busy(n: int) -> list[subprocess.Popen]:
    """Real CPU-burning processes beside the planner (killed by PID by the caller)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def _plan_of(path: Path):
    from medlens.config import load_config
    from medlens.engine.planner import Plan

    return Plan.model_validate(load_config(path).plan)


def test_same_plan_twice_even_under_load(tmp_path, cache):
    data = _file(tmp_path)
    first, second = tmp_path / "p1.yaml", tmp_path / "p2.yaml"
    r1 = _plan(data, first)
    assert (cache / "machine.json").exists()
    busy = _busy(max(2, os.cpu_count() or 1))
    try:
        r2 = _plan(data, second)
        # the busy processes really ran beside the second plan
        assert all(p.poll() is None for p in busy)
    finally:
        _stop(busy)
    assert first.read_bytes() == second.read_bytes()
    out1, out2 = " ".join((r1.stdout + r1.stderr).split()), " ".join((r2.stdout + r2.stderr).split())
    assert "0 stored" in out1 and "0 measured now" in out2
    p = _plan_of(second)
    assert [d.model_dump() for d in p.decisions] == [d.model_dump() for d in _plan_of(first).decisions]
    # the machine the figures belong to
    assert p.machine["cores"] == os.cpu_count() and p.machine["torch"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert p.machine["cpu"] and (p.machine["cpu"] in cpuinfo or not cpuinfo)
    stored = json.loads((cache / "machine.json").read_text())
    (entry,) = stored["machines"].values()
    assert entry["machine"] == {k: p.machine[k] for k in ("cpu", "cores", "torch")}
    # the plan's speeds are the stored figures
    probes = [v for k, v in entry["figures"].items() if k.startswith("probe ")]
    assert sorted(json.dumps(s, sort_keys=True) for s in p.speeds) == \
        sorted(json.dumps(s, sort_keys=True) for s in probes)


def test_plan_follows_the_stored_figures_and_refuses_invalid_ones(tmp_path, cache):
    data = _file(tmp_path)
    _plan(data, tmp_path / "p1.yaml")
    base = _plan_of(tmp_path / "p1.yaml")
    f = cache / "machine.json"
    stored = json.loads(f.read_text())
    (entry,) = stored["machines"].values()
    (epoch_key,) = [k for k in entry["figures"] if k.startswith("probe ") and '"probe": "epoch"' in k]
    cal = entry["figures"][epoch_key]
    # a machine ten times slower, as stored: the plan's epoch time follows the file, not a new measurement
    slow = {**cal, "train_img_per_s": cal["train_img_per_s"] / 10, "val_img_per_s": cal["val_img_per_s"] / 10,
            "epoch_seconds": None if cal["epoch_seconds"] is None else cal["epoch_seconds"] * 10}
    entry["figures"][epoch_key] = slow
    f.write_text(json.dumps(stored))
    _plan(data, tmp_path / "p2.yaml")
    slowed = _plan_of(tmp_path / "p2.yaml")
    assert slowed.estimates["epoch_s"] > 5 * base.estimates["epoch_s"]
    assert slowed.estimates["load_s"] == base.estimates["load_s"]

    # an invalid stored figure is reported in one line and measured again
    entry["figures"][epoch_key] = {**cal, "train_img_per_s": -3}
    f.write_text(json.dumps(stored))
    r = _plan(data, tmp_path / "p3.yaml")
    assert "invalid cached figure" in r.stdout + r.stderr
    fixed = json.loads(f.read_text())
    assert list(fixed["machines"].values())[0]["figures"][epoch_key]["train_img_per_s"] > 0

    # a file that is not JSON: reported, everything measured again, the file rewritten whole
    f.write_text("{not json")
    r = _plan(data, tmp_path / "p4.yaml")
    assert "unreadable machine figures" in r.stdout + r.stderr
    assert json.loads(f.read_text())["version"] == 1

    # --recalibrate measures again instead of reusing
    r = _plan(data, tmp_path / "p5.yaml", "2m", "--recalibrate")
    assert "0 stored" in " ".join((r.stdout + r.stderr).split())


def test_changed_budget_changes_the_plan(tmp_path, cache):
    data = _file(tmp_path)
    _plan(data, tmp_path / "a.yaml", "2m")
    _plan(data, tmp_path / "b.yaml", "4m")
    a, b = _plan_of(tmp_path / "a.yaml"), _plan_of(tmp_path / "b.yaml")
    by_a, by_b = {d.setting: d.value for d in a.decisions}, {d.setting: d.value for d in b.decisions}
    assert by_b["train.max_minutes"] > by_a["train.max_minutes"]
    assert a.machine == b.machine


def test_too_small_budget_names_the_same_minimum_under_load(tmp_path, cache):
    data = _file(tmp_path)
    r1 = medlens("plan", data, "--budget", "20s", "--out", tmp_path / "p.yaml")
    busy = _busy(max(2, os.cpu_count() or 1))
    try:
        r2 = medlens("plan", data, "--budget", "20s", "--out", tmp_path / "p.yaml")
    finally:
        _stop(busy)
    assert r1.returncode == r2.returncode == 2
    e1, e2 = " ".join(r1.stderr.split()), " ".join(r2.stderr.split())
    assert "give at least" in e1 and e1 == e2
    assert not (tmp_path / "p.yaml").exists()


def test_architecture_by_measurement_gives_the_same_plan_twice(tmp_path, cache, monkeypatch):
    """From 5m the plan probes the candidate architectures and runs their signals (here with a 1% share of the
    budget instead of 10% and at least 5 steps instead of 20, to keep the test short: at 0.5% and 20 steps a loaded
    machine left every candidate under the minimum, so no signal ran); the second plan reuses the stored signals:
    the same bytes."""
    from medlens.engine import planner

    monkeypatch.setattr(planner, "SIGNAL_SHARE", 0.01)
    monkeypatch.setattr(planner, "SIGNAL_MIN_STEPS", 5)
    data = _file(tmp_path)
    r1 = _plan(data, tmp_path / "a.yaml", "5m")
    r2 = _plan(data, tmp_path / "b.yaml", "5m")
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()
    assert "signal " in r1.stdout + r1.stderr and "0 measured now" in " ".join((r2.stdout + r2.stderr).split())
    p = _plan_of(tmp_path / "a.yaml")
    (model,) = [d for d in p.decisions if d.setting == "model"]
    assert p.signals and all(0 <= s["auc"] <= 1 and s["steps"] >= planner.SIGNAL_MIN_STEPS for s in p.signals)
    for label in ("small_cnn 32/64/128", "small_cnn 64/128/256", "resnet18", "vit"):   # every candidate's figures
        assert f"{label} " in model.reason
    assert model.value["name"] in ("small_cnn", "resnet18", "vit") and "epochs in the budget" in model.reason
    stored = json.loads((cache / "machine.json").read_text())
    (entry,) = stored["machines"].values()
    assert sorted(json.dumps(s, sort_keys=True) for s in p.signals) == \
        sorted(json.dumps(v, sort_keys=True) for k, v in entry["figures"].items() if k.startswith("signal "))
