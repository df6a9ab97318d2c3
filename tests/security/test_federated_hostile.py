"""Issue 25, federated hardening: the medlens federated server and client against hostile peers.

Every peer is a real process on 127.0.0.1: the real ``medlens federate server`` / ``client`` beside small
Flower scripts (tests/security/hostile/flower_client.py, flower_server.py) that poison updates, hang, ask for
10**6 local epochs or send NaN weights. Real PneumoniaMNIST slices; each process is stopped by PID at the end.
"""

from __future__ import annotations

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

from clirun import medlens as medlens_inproc
from conftest import QUICK_EXPLAIN

HOSTILE = Path(__file__).parent / "hostile"
MEDLENS = [sys.executable, "-m", "medlens.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def procs():
    """Started processes; each still running at the end is killed by its PID."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _start(procs, args, **kw) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw)
    procs.append(p)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, server: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.time() + limit
    while True:
        assert server.poll() is None, server.communicate()[0][-3000:]
        assert time.time() < deadline, "the server did not start"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)


def _npz(root: Path, out: Path, start: int, ntr: int, nva: int, nte: int) -> Path:
    d = np.load(root / "medmnist" / "pneumoniamnist.npz")
    arrays = {}
    for s, n in (("train", ntr), ("val", nva), ("test", nte)):
        sel = np.random.default_rng(0).permutation(len(d[f"{s}_labels"]))[start:start + n]
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = d[f"{s}_images"][sel], d[f"{s}_labels"][sel]
    np.savez(out, **arrays)
    return out


def _config(tmp: Path, npz: Path, name: str) -> Path:
    cfg = {"name": name, "seed": 0, "output_dir": str(tmp),
           "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "path": str(npz), "check_md5": False},
           "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
           "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "precision": "32", "num_threads": 1},
           "evaluation": {"bootstrap": 20}, "explain": QUICK_EXPLAIN}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _server(procs, tmp, server_cfg, port, run_dir, *extra) -> subprocess.Popen:
    return _start(procs, MEDLENS + ["federate", "server", str(server_cfg), "--address", f"127.0.0.1:{port}",
                                    "--run-dir", str(run_dir), *map(str, extra)])


def _hostile_client(procs, port, site, *extra) -> subprocess.Popen:
    return _start(procs, [sys.executable, str(HOSTILE / "flower_client.py"), "--server", f"127.0.0.1:{port}",
                          "--site", site, *map(str, extra)])


def test_poisoned_and_unauthenticated_updates_are_dropped_and_counted(tmp_path, data_root, procs):
    """A site with a valid secret sends 1e30, then NaN, then wrong shapes; an impostor with a wrong secret
    sends plausible weights. Only the honest site's updates are aggregated; each drop is counted in
    federated.json; the global model stays finite and beats the untrained one, and the run is complete."""
    server_npz = _npz(data_root, tmp_path / "server.npz", 0, 20, 100, 60)
    site_npz = _npz(data_root, tmp_path / "site1.npz", 100, 200, 30, 10)
    secrets = tmp_path / "sites.txt"
    secrets.write_text("site1 honest-secret-0123456789\nevil evil-but-valid-secret-42\n")
    (tmp_path / "site1.secret").write_text("honest-secret-0123456789\n")
    port, run_dir = _free_port(), tmp_path / "run"
    server = _server(procs, tmp_path, _config(tmp_path, server_npz, "srv"), port, run_dir, "--clients", 3,
                     "--min-fit-clients", 1, "--rounds", 3, "--round-timeout", 60, "--site-secrets", secrets)
    honest = _start(procs, MEDLENS + ["federate", "client", str(_config(tmp_path, site_npz, "site")), "--site-data",
                                      str(site_npz), "--site", "site1", "--secret-file", str(tmp_path / "site1.secret"),
                                      "--server", f"127.0.0.1:{port}", "--connect-timeout", 90])
    _wait_listening(port, server)
    evil = _hostile_client(procs, port, "evil", "--secret", "evil-but-valid-secret-42", "--modes", "huge,nan,shape",
                           "--eval", "nan")
    impostor = _hostile_client(procs, port, "site1", "--secret", "guessed-secret-000000000", "--modes", "same")
    out, err = server.communicate(timeout=240)
    assert server.returncode == 0, (out + err)[-3000:]
    assert honest.wait(timeout=60) == 0, honest.communicate()[1][-2000:]

    fed = json.loads((run_dir / "federated.json").read_text())
    rounds = fed["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["fit_results"] == 3 and r["fit_accepted"] == 1 and r["fit_rejected"] == 2 for r in rounds)
    assert fed["updates_rejected"] == 6
    reasons = {(r["round"], x["site"], x["step"]): x["reason"] for r in rounds for x in r["rejected"]}
    assert "update norm" in reasons[(1, "evil", "fit")]
    assert "non-finite" in reasons[(2, "evil", "fit")]
    assert "shape" in reasons[(3, "evil", "fit")]
    assert all("not authenticated" in reasons[(k, "site1", "fit")] for k in (1, 2, 3))
    assert all("non-finite" in reasons[(k, "evil", "evaluate")] for k in (1, 2, 3))
    assert set(rounds[-1]["sites"]) == {"site1"}   # the impostor's claim to be site1 recorded nothing
    assert "dropped" in out
    # the global model: finite, and better than the untrained network on the server's validation split
    import torch

    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert rounds[-1]["global_val_auc"] > fed["initial_val_auc"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert fed["status"] == "complete"
    for p in (evil, impostor):
        p.wait(timeout=30)


def test_killed_and_hanging_sites_do_not_hold_the_rounds(tmp_path, data_root, procs):
    """One site is killed (-9) in the middle of its fit, another hangs in evaluate, and round 2 has no site
    left: every wait ends at --round-timeout. No update moved the model, so the run is marked failed."""
    server_npz = _npz(data_root, tmp_path / "server.npz", 0, 20, 100, 60)
    port, run_dir = _free_port(), tmp_path / "run"
    timeout = 4
    server = _server(procs, tmp_path, _config(tmp_path, server_npz, "srv"), port, run_dir, "--clients", 2,
                     "--min-fit-clients", 1, "--rounds", 2, "--round-timeout", timeout)
    _wait_listening(port, server)
    marker = tmp_path / "in_fit"
    victim = _hostile_client(procs, port, "victim", "--modes", "hang", "--marker", marker)
    _hostile_client(procs, port, "stuck", "--modes", "same", "--eval", "hang")
    deadline = time.time() + 90
    while not marker.exists():
        assert time.time() < deadline and server.poll() is None, "round 1 never started"
        time.sleep(0.2)
    t_kill = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    _, err = server.communicate(timeout=150)
    elapsed = time.time() - t_kill
    # evaluate of round 1 (the hanging site), then fit and evaluate of round 2 (no site): three timeouts
    assert elapsed < 3 * timeout + 60, elapsed
    assert server.returncode != 0 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # Flower's own log lines go to stderr
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert "federated run marked failed" in errors[0] and "does not beat the untrained" in errors[0]
    fed = json.loads((run_dir / "federated.json").read_text())
    r1, r2 = fed["rounds"]
    assert r1["fit_failures"] == 1 and r1["fit_accepted"] == 1   # the killed site failed, the other counted
    assert r1["evaluate_failures"] == 1                           # the hanging evaluate timed out
    assert r2["fit_results"] == 0
    assert fed["status"] == "failed"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_the_site_refuses_a_hostile_server(tmp_path, data_root, procs):
    """The real client against servers that ask 10**6 local epochs or mu 1e30, send NaN weights, never speak,
    or vanish: each time a one-line error within seconds, never "federation finished". The five hostile servers
    are real processes, started side by side; the site is the `medlens federate client` command run in this
    process (``clirun``), one server after the other: five site processes spent their whole time importing."""
    site_npz = _npz(data_root, tmp_path / "site.npz", 100, 60, 20, 10)
    cfg = _config(tmp_path, site_npz, "site")
    cases = {"epochs": "asked for local_epochs=1000000", "mu": "asked for proximal_mu=1e+30",
             "nan": "weights this site refuses: array 0 holds non-finite values",
             "silent": "no word from the federated server", "vanish": "closed the connection (UNAVAILABLE)"}
    ports = {}
    for mode in cases:
        ports[mode] = _free_port()
        server = _start(procs, [sys.executable, str(HOSTILE / "flower_server.py"), "--address",
                                f"127.0.0.1:{ports[mode]}", "--mode", mode])
        _wait_listening(ports[mode], server)
    for mode, needle in cases.items():
        t0 = time.time()
        r = medlens_inproc("federate", "client", cfg, "--site-data", site_npz, "--server", f"127.0.0.1:{ports[mode]}",
                           "--connect-timeout", 60, "--server-timeout", 3)
        assert r.returncode != 0 and "federation finished" not in r.stdout, (mode, r.stdout[-2000:])
        _one_line_error(r.stderr, needle)
        assert time.time() - t0 < 30, (mode, time.time() - t0)   # seconds, not the 60 s connect timeout


def test_client_gives_up_on_an_unreachable_server(tmp_path, data_root):
    site_npz = _npz(data_root, tmp_path / "site.npz", 100, 60, 20, 10)
    t0 = time.time()
    r = medlens_inproc("federate", "client", _config(tmp_path, site_npz, "site"), "--site-data", site_npz,
                       "--server", f"127.0.0.1:{_free_port()}", "--connect-timeout", 2)
    assert r.returncode != 0 and time.time() - t0 < 60
    _one_line_error(r.stderr, "did not answer within 2 s")


def test_non_local_address_without_tls_is_refused(tmp_path, data_root):
    server_npz = _npz(data_root, tmp_path / "server.npz", 0, 20, 40, 20)
    cfg = _config(tmp_path, server_npz, "srv")
    port = _free_port()
    r = medlens_inproc("federate", "server", cfg, "--address", f"0.0.0.0:{port}", "--run-dir", tmp_path / "r")
    _one_line_error(r.stderr, "0.0.0.0", "TLS is off", "--insecure")
    assert not (tmp_path / "r").exists()
    with pytest.raises(OSError):  # nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    secrets = tmp_path / "sites.txt"
    secrets.write_text("site1 honest-secret-0123456789\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before the address")
    r = medlens_inproc("federate", "server", cfg, "--address", f"[::]:{port}", "--certificates", f"{ca},{ca},{ca}",
                       "--run-dir", tmp_path / "r")
    _one_line_error(r.stderr, "--site-secrets")
    # the site side: a remote server without --root-cert
    r = medlens_inproc("federate", "client", cfg, "--site-data", server_npz, "--server", "10.11.12.13:8080")
    _one_line_error(r.stderr, "10.11.12.13:8080", "TLS is off", "--root-cert")
