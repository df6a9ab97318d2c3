"""Issue 15: federated learning over Flower's real gRPC transport: a server and three site processes on
localhost (real PneumoniaMNIST slices, one per site). The global model improves over the rounds; a site whose
model config differs from the server's stops with a one-line error, the rounds go on with the others and the
report says so; the result is an ordinary run folder that evaluate / report / predict accept."""

import json
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

from medlens.cli.main import main
from probes import assert_no_federate_chatter
from medlens.run import Run
from conftest import QUICK_EXPLAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDLENS = [sys.executable, "-m", "medlens.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(root: Path, tmp: Path) -> list[Path]:
    """Disjoint real slices of PneumoniaMNIST: the server's (validation/test) and three sites'."""
    d = np.load(root / "medmnist" / "pneumoniamnist.npz")
    rng = np.random.default_rng(0)
    idx = {s: rng.permutation(len(d[f"{s}_labels"])) for s in ("train", "val", "test")}
    files = []
    for k, (ntr, nva, nte) in enumerate([(60, 100, 150), (150, 40, 20), (150, 40, 20), (150, 40, 20)]):
        out = {}
        for s, n in (("train", ntr), ("val", nva), ("test", nte)):
            start = {"train": [0, 60, 210, 360][k], "val": [0, 100, 140, 180][k], "test": [0, 150, 170, 190][k]}[s]
            sel = idx[s][start:start + n]
            out[f"{s}_images"], out[f"{s}_labels"] = d[f"{s}_images"][sel], d[f"{s}_labels"][sel]
        files.append(tmp / ("server.npz" if k == 0 else f"site{k}.npz"))
        np.savez(files[-1], **out)
    return files


def _config(tmp: Path, npz: Path, widths, name: str) -> Path:
    cfg = {"name": name, "seed": 0, "output_dir": str(tmp),
           "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "path": str(npz), "check_md5": False},
           "model": {"name": "small_cnn", "params": {"widths": widths}},
           "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "precision": "32", "num_threads": 1},
           "evaluation": {"bootstrap": 50}, "explain": QUICK_EXPLAIN}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_server_and_three_site_processes(tmp_path, data_root):
    server_npz, *sites = _slices(data_root, tmp_path)
    port = _free_port()
    run_dir = tmp_path / "fed_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(MEDLENS + ["federate", "server", str(_config(tmp_path, server_npz, [8, 16, 32], "srv")),
                                         "--clients", "3", "--min-fit-clients", "2", "--rounds", "3",
                                         "--address", f"127.0.0.1:{port}", "--run-dir", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while True:  # the clients connect once the server listens
        assert server.poll() is None and time.time() < deadline, "the server did not start"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    good = _config(tmp_path, sites[0], [8, 16, 32], "site")
    bad = _config(tmp_path, sites[2], [8, 16, 48], "other")  # a different network than the server's
    procs = [subprocess.Popen(MEDLENS + ["federate", "client", str(c), "--site-data", str(f), "--server",
                                         f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for c, f in ((good, sites[0]), (good, sites[1]), (bad, sites[2]))]
    try:
        out, _ = server.communicate(timeout=240)
        assert server.returncode == 0, out[-3000:]
        good_out = [p.communicate(timeout=60) for p in procs[:2]]
        bad_out, bad_err = procs[2].communicate(timeout=60)
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    # the console carries medlens's own lines only: no Flower log lines or deprecations, no colour codes (issue 29)
    assert "round 3:" in out and all(p.returncode == 0 for p in procs[:2]), out[-2000:]
    assert "federation finished" in good_out[0][0], good_out[0]
    for text in (out, *(o + e for o, e in good_out)):
        assert_no_federate_chatter(text)
    # the mismatched site: a one-line error naming its config
    assert procs[2].returncode != 0
    err = [ln for ln in bad_err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "model config mismatch" in err[0] and "other.yaml" in err[0]

    fed = json.loads((run_dir / "federated.json").read_text())
    rounds = fed["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["fit_failures"] == 1 and rounds[0]["fit_results"] == 2
    assert fed["rounds_with_failures"] and fed["rounds_with_failures"][0] == 1
    assert all(r["fit_results"] == 2 for r in rounds[1:])
    # the global model improves over the rounds: from the untrained network Flower evaluated before round 1
    assert fed["initial_val_auc"] is not None
    assert rounds[-1]["global_val_auc"] > fed["initial_val_auc"] + 0.1
    # the weights that travelled: float32 state dict, down to 2-3 sites and up from 2, each round
    n_bytes = sum(v.numel() * v.element_size() for v in Run.open(run_dir).model.state_dict().values())
    assert rounds[1]["bytes_up"] >= 2 * n_bytes and rounds[1]["bytes_up"] < 2 * n_bytes * 1.1
    assert "failed" in (run_dir / "report.html").read_text()

    # an ordinary run folder: evaluate, report and predict accept it unchanged
    assert main(["evaluate", str(run_dir)]) == 0
    assert main(["report", str(run_dir)]) == 0
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.load(server_npz)["test_images"][0]).save(png)
    assert main(["predict", str(run_dir), str(png)]) == 0
