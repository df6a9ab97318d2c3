"""Shared fixtures. Integration tests read real data from $MEDLENS_DATA (CI: ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    like ``trained_run``) is an integration test: ``pytest -m "not integration"`` runs without a data folder."""
    for item in items:
        if "data_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def tiny_config(tmp: Path, name: str = "tiny", **over):
    """A quick PneumoniaMNIST experiment (few hundred images, 2 epochs)."""
    from medlens.config import config_from_dict

    d = {"name": name, "seed": 0, "output_dir": str(tmp),
         "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 300},
         "model": {"name": "small_cnn", "params": {"widths": [8, 16, 32]}},
         "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "precision": "32",
                   "augment": {"rotate": 10, "hflip": 0.5}},
         "evaluation": {"bootstrap": 50}}
    for k, v in over.items():
        sec, _, key = k.partition("__")
        if key:
            d.setdefault(sec, {})[key] = v
        else:
            d[sec] = v
    return config_from_dict(d)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root) -> Path:
    """One tiny trained PneumoniaMNIST run shared by the tests that only read a run folder."""
    from medlens.workflow.train import train

    tmp = tmp_path_factory.mktemp("runs")
    return train(tiny_config(tmp, "shared"), progress_bar=False)
