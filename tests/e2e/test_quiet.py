"""The console carries medlens's own lines only: no third-party chatter from real `medlens train` and
`medlens federate` processes (Lightning tips, Flower deprecations and log lines, raw ANSI colour codes when
the output is not a terminal, warnings printed from Ray's worker processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHATTER = ("Tip:", "litlogger", "GPU available", "TPU available", "Automatic Mixed Precision",
           "Loading `train_dataloader`", "`Trainer.fit` stopped")
# Flower's deprecation notices and log lines ("INFO :  [ROUND 1]"), Ray's actor prefix "(ClientAppActor pid=..)",
# Python warnings from any process, and colour codes
FEDERATE_CHATTER = ("DEPRECATED", "deprecated", "flwr", "Flower", "INFO ", "WARNING ", "ClientAppActor",
                    "Warning:", "not writable", "\x1b[")


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


def _no_chatter(text: str) -> None:
    found = [c for c in FEDERATE_CHATTER if c in text]
    assert not found, f"library chatter on the console: {found}\n{text[-4000:]}"


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
    _no_chatter(r.stdout + r.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.slow
def test_federate_server_and_client_print_no_library_chatter(tmp_path, data_root):
    d = np.load(data_root / "medmnist" / "pneumoniamnist.npz")
    files = []
    for k, lo in enumerate((0, 100)):  # two disjoint real slices: the server's and the site's
        npz = tmp_path / f"part{k}.npz"
        np.savez(npz, **{f"{s}_{a}": d[f"{s}_{a}"][lo:lo + 100] for s in ("train", "val", "test")
                         for a in ("images", "labels")})
        files.append(npz)
    cfg = {"name": "quiet_fed", "seed": 0, "output_dir": str(tmp_path),
           "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "path": str(files[0]),
                    "check_md5": False},
           "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
           "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "precision": "32", "num_threads": 1},
           "evaluation": {"bootstrap": 20}}
    cfg_path = tmp_path / "quiet_fed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDLENS_DATA": str(data_root)}
    server = subprocess.Popen([_medlens(), "federate", "server", str(cfg_path), "--clients", "1", "--rounds", "1",
                               "--address", f"127.0.0.1:{port}", "--run-dir", str(tmp_path / "fed_run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    client = None
    try:
        deadline = time.time() + 120
        while True:  # the client connects once the server listens
            assert server.poll() is None and time.time() < deadline, "the server did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        client = subprocess.Popen([_medlens(), "federate", "client", str(cfg_path), "--site-data", str(files[1]),
                                   "--server", f"127.0.0.1:{port}", "--site", "site1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        s_out, s_err = server.communicate(timeout=240)
        c_out, c_err = client.communicate(timeout=60)
    finally:
        for p in (server, client):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    assert server.returncode == 0, s_err[-4000:]
    assert client.returncode == 0, c_err[-4000:]
    assert "round 1: 1 site(s) fitted" in s_out, s_out
    assert "site site1: federation finished" in c_out, c_out
    _no_chatter(s_out + s_err)
    _no_chatter(c_out + c_err)
