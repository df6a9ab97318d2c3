"""Issue 29: federated strategies are a registry (``medlens.engine.strategies``, timm's pattern).

A toy strategy registered from this test module, and nowhere else, is accepted by ``medlens federate server
--strategy toy``: a real federation (the server in this process, one real ``medlens federate client``
process on 127.0.0.1, real PneumoniaMNIST slices) aggregates with it, behind the same checks as the built-in
strategies. Once unregistered, the name is refused again in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from clirun import medlens as medlens_inproc
from flwr.server.strategy import FedAvg

from medlens.engine.strategies import (
    get_strategy,
    list_strategies,
    register_strategy,
    unregister_strategy,
)
from medlens.errors import ConfigError
from conftest import QUICK_EXPLAIN

pytestmark = [pytest.mark.integration]

MEDLENS = [sys.executable, "-m", "medlens.cli.main"]
CALLS: list[dict] = []


class ToyAvg(FedAvg):
    """FedAvg that records each aggregation and the option its builder passed."""

    def __init__(self, *, toy_option: str, **kw) -> None:
        super().__init__(**kw)
        self.toy_option = toy_option

    def aggregate_fit(self, server_round, results, failures):
        CALLS.append({"round": server_round, "results": len(results), "option": self.toy_option})
        return super().aggregate_fit(server_round, results, failures)


@pytest.fixture
def toy_strategy():
    CALLS.clear()

    @register_strategy("toy")
    def toy(settings):
        """Toy: FedAvg that records its calls (registered by this test)."""
        return ToyAvg, {"toy_option": f"mu={settings.proximal_mu}"}

    yield "toy"
    unregister_strategy("toy")


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_the_registry_lists_the_built_in_strategies_and_refuses_an_unknown_one_in_one_line():
    assert {"fedavg", "fedprox", "fedadam"} <= set(list_strategies())
    with pytest.raises(ConfigError, match=r"--strategy 'fedavgg' is not one of .*did you mean 'fedavg'"):
        get_strategy("fedavgg")


def test_a_strategy_registered_from_a_test_module_runs_a_real_federation(tmp_path, data_root, procs, toy_strategy):
    assert toy_strategy in list_strategies()
    server_npz = _npz(data_root, tmp_path / "server.npz", 0, 20, 100, 60)
    site_npz = _npz(data_root, tmp_path / "site1.npz", 100, 200, 30, 10)
    port, run_dir = _free_port(), tmp_path / "run"
    client = subprocess.Popen(
        [*MEDLENS, "federate", "client", str(_config(tmp_path, site_npz, "site")), "--site-data", str(site_npz),
         "--site", "site1", "--server", f"127.0.0.1:{port}", "--connect-timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    procs.append(client)
    r = medlens_inproc("federate", "server", _config(tmp_path, server_npz, "srv"), "--address",
                       f"127.0.0.1:{port}", "--clients", 1, "--rounds", 2, "--round-timeout", 60,
                       "--join-timeout", 90, "--strategy", toy_strategy, "--run-dir", run_dir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert client.wait(timeout=60) == 0, client.communicate()[1][-2000:]

    # the toy class aggregated every round, built with the option its builder derived from the settings
    assert [c["round"] for c in CALLS] == [1, 2]
    assert all(c["results"] == 1 and c["option"] == "mu=0.01" for c in CALLS)
    fed = json.loads((run_dir / "federated.json").read_text())
    assert fed["strategy"] == "toy" and fed["status"] == "complete"
    # the result checks of every strategy ran around it (each update accepted after the checks)
    assert [r["fit_accepted"] for r in fed["rounds"]] == [1, 1]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_an_unregistered_strategy_is_refused_by_the_cli_in_one_line(tmp_path, data_root, toy_strategy):
    unregister_strategy(toy_strategy)
    cfg = _config(tmp_path, _npz(data_root, tmp_path / "server.npz", 0, 20, 20, 20), "srv")
    r = medlens_inproc("federate", "server", cfg, "--address", f"127.0.0.1:{_free_port()}", "--clients", 1,
                       "--strategy", toy_strategy, "--run-dir", tmp_path / "run")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--strategy 'toy' is not one of" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_builder_that_returns_no_fedavg_family_class_is_refused_in_one_line():
    @register_strategy("not_a_strategy")
    def bad(settings):
        """Returns a class Flower's FedAvg machinery cannot drive."""
        return dict, {}

    try:
        from medlens.workflow.federate import make_strategy

        with pytest.raises(ConfigError, match="not a Flower strategy of the FedAvg family"):
            make_strategy("not_a_strategy", [np.zeros(2, np.float32)], 1, "sig", 1, None)
    finally:
        unregister_strategy("not_a_strategy")
    assert "not_a_strategy" not in list_strategies()
