"""Shared fixtures. Integration tests read real data from $MEDLENS_DATA (CI: ../shared/data).

`make test` runs the suite on two pytest-xdist workers (``-n 2 --dist loadscope``; the Makefile says why not
three): each module runs whole on one worker (its module fixtures are built once), the slowest modules first
(``SLOW_FIRST``) so that the workers finish at about the same time. Session fixtures that train (``trained_run``)
are built once for the whole run, by whichever worker needs them first, and read by the others
(``shared_folder``). Plain ``pytest`` (no ``-n``) runs everything in one process, as before.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: "gw0", "gw1", ... in a pytest-xdist worker; None in a plain pytest run
WORKER = os.environ.get("PYTEST_XDIST_WORKER")

# OpenMP threads (torch's CPU pool, MKL) that finish a parallel region spin for a while before they sleep: with
# more busy threads than cores (two xdist workers, the processes a test starts, anything else on the machine)
# the spinning takes the cores from the work. A tiny training measured on the 2-core CI machine under load:
# 16 s of CPU with the default policy, 6 s with PASSIVE. Results are unchanged (only how idle threads wait).
# Set before torch is imported (the test modules import it); the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The prepared store (medlens.data.store) of this test process: a temporary folder, removed at exit, so the tests
# write nothing under the home folder and never read another run's entries; the processes the tests start inherit it.
if not os.environ.get("MEDLENS_CACHE"):
    os.environ["MEDLENS_CACHE"] = tempfile.mkdtemp(prefix="medlens-store-")
    atexit.register(shutil.rmtree, os.environ["MEDLENS_CACHE"], True)

#: test modules in the order they are handed out under xdist, slowest first (a module that trains several
#: models or drives many real processes; by the wall time of each module in a two-worker run); every other module
#: follows in collection order.
#: Only the schedule depends on this list: a module missing from it still runs.
SLOW_FIRST = [
    "tests/e2e/test_readme.py",
    "tests/integration/test_segmentation.py",
    "tests/e2e/test_quiet.py",
    "tests/integration/test_training.py",
    "tests/integration/test_imaging.py",
    "tests/security/test_runs_and_reports.py",
    "tests/security/test_federated_hostile.py",
    "tests/security/test_network_exits.py",
    "tests/integration/test_ddp.py",
    "tests/integration/test_explain_runs.py",
    "tests/security/test_inputs.py",
    "tests/e2e/test_serve.py",
    "tests/integration/test_export.py",
    "tests/integration/test_federated.py",
    "tests/integration/test_batch_predict.py",
    "tests/e2e/test_pacs_roundtrip.py",
    "tests/integration/test_accuracy_run.py",
    "tests/integration/test_store.py",
    "tests/e2e/test_gateway.py",
    "tests/security/test_serve_exits.py",
    "tests/e2e/test_cli.py",
    "tests/integration/test_gateway_ups.py",
    "tests/integration/test_detect.py",
    "tests/e2e/test_cli_segment.py",
    "tests/integration/test_gateway_parts.py",
    "tests/integration/test_clinical_report.py",
    "tests/e2e/test_gateway_status.py",
]


#: set in an xdist worker (80 x 24) though the run itself has none: the CLI then sizes its tables to 80 columns
#: instead of its 160 for pipes and logs, and tests that read the tables fail under xdist only
_TERMINAL_VARS = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(xdist, in the controller) hand each worker the terminal variables of the run."""
    node.workerinput["terminal_env"] = {k: os.environ.get(k) for k in _TERMINAL_VARS}


def pytest_configure(config):
    """(xdist, in a worker) the tests see the run's terminal variables, as without xdist."""
    for k, v in getattr(config, "workerinput", {}).get("terminal_env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _data_root() -> Path:
    env = os.environ.get("MEDLENS_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not root.exists():
        raise RuntimeError(f"real test data not found at {root}; set MEDLENS_DATA (CI uses ../shared/data)")
    return root.resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    os.environ["MEDLENS_DATA"] = str(root)
    return root


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # keep the MD5 'verified' cache and any user files out of the real home directory
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))


def pytest_collection_modifyitems(config, items):
    """A test that reads the real data (the ``data_root`` fixture, directly or through a fixture built on it,
    like ``trained_run``) is an integration test: ``pytest -m "not integration"`` runs without a data folder.
    Under xdist the slowest modules are moved to the front (``SLOW_FIRST``) and the modules with an ``alone``
    test to the end (the other worker then waits for a short test, not a long one), each module's tests kept
    together and in their order; every worker computes the same order, as xdist requires."""
    for item in items:
        if "data_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    if WORKER:
        rank = {m: i for i, m in enumerate(SLOW_FIRST)}
        alone = {it.nodeid.split("::")[0] for it in items if it.get_closest_marker("alone")}

        def key(it):
            module = it.nodeid.split("::")[0]
            return module in alone, rank.get(module, len(rank))

        items.sort(key=key)  # stable: each module's tests stay together and in their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist a test marked ``alone`` runs while no other worker runs a test: it measures wall time against
    a budget that the code planned from the machine's speed, which another worker's load would change half-way.
    Every test holds a shared lock from its setup to its teardown, an ``alone`` test an exclusive one; a gate,
    passed before the lock, keeps new tests from starting while an ``alone`` test waits for the running ones."""
    if not WORKER:
        return (yield)
    root = item.config._tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
    mode = fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH
    with open(root / "alone.gate", "a") as gate, open(root / "alone.lock", "a") as lock:
        fcntl.flock(gate, mode)
        fcntl.flock(lock, mode)
        if mode == fcntl.LOCK_SH:
            fcntl.flock(gate, fcntl.LOCK_UN)
        return (yield)  # closing the files releases the locks


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package, driven by playwright from the test extra; no browser download), one
    per test module: the serve viewer and the gateway's status page."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium not installed (make test installs Debian's chromium package)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test run, for every worker: under pytest-xdist the first worker to ask builds
    it while holding a file lock (pytest-xdist's documented pattern) and the others wait, then read the same
    folder; without xdist, a plain ``mktemp``. ``build`` returns the path the fixture gives (a run folder).
    Tests must treat what it returns as read-only (copy it to change it)."""
    if not WORKER:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)  # left half-built by a worker whose build failed
            folder.mkdir()
            done.write_text(json.dumps({"path": str(build(folder))}))
        return Path(json.loads(done.read_text())["path"])


#: the report's explanation of a test run that does not test the method search: named (Grad-CAM) and scored on 8
#: test images. The search over every method plus scoring on 32 images was half a tiny run's CPU (3.5 of 6.9 s).
QUICK_EXPLAIN = {"method": "gradcam", "score_images": 8}


def tiny_config(tmp: Path, name: str = "tiny", **over):
    """A quick PneumoniaMNIST experiment (few hundred images, 2 epochs).

    The report's explanation is ``QUICK_EXPLAIN``; the shared ``trained_run`` keeps the search, which the
    explanation tests read."""
    from medlens.config import config_from_dict

    d = {"name": name, "seed": 0, "output_dir": str(tmp),
         "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 300},
         "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
         "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "precision": "32",
                   "augment": {"rotate": 10, "hflip": 0.5}},
         "evaluation": {"bootstrap": 50}, "explain": dict(QUICK_EXPLAIN)}
    for k, v in over.items():
        sec, _, key = k.partition("__")
        if key:
            d.setdefault(sec, {})[key] = v
        else:
            d[sec] = v
    return config_from_dict(d)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root) -> Path:
    """One tiny trained PneumoniaMNIST run shared by the tests that only read a run folder (under xdist, by
    every worker: built once). A test that changes it works on a copy."""
    from medlens.workflow.train import train

    return shared_folder(tmp_path_factory, "trained_run",
                         lambda tmp: train(tiny_config(tmp, "shared", explain={}), progress_bar=False))
