"""Data sources are a registry (issue 29 item 4): a new ``data.source`` is one registered ``DataSource``, with no
edit elsewhere; the config checks names against the registry; both dataset classes satisfy the ``Dataset``
protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medlens.config import config_from_dict
from medlens.data.base import ArrayDataset, Dataset, SplitData
from medlens.data.sources import DataSource, get_source, list_sources, register_source, unregister_source
from medlens.errors import ConfigError


class ToySource(DataSource):
    """Synthetic squares: class 1 has a bright square in the middle, class 0 is dark noise."""

    name = "toy_squares"
    summary = "synthetic bright-square images (a test source)"
    needs_path = False
    plan_suffixes = (".toy",)   # `medlens plan squares.toy` starts from this source
    loaded = 0

    def plan_section(self, path: str) -> dict:
        return {"source": self.name, "size": 16}

    def check(self, cfg, task) -> None:
        if cfg.size < 8:
            raise ValueError("data.size: the toy source draws squares of at least 8 pixels")

    def load(self, cfg, *, seed, prepare, progress):
        type(self).loaded += 1
        rng = np.random.default_rng(seed)

        def split(n, tag):
            y = np.arange(n) % 2
            x = rng.integers(0, 60, (n, 1, cfg.size, cfg.size)).astype(np.uint8)
            c = cfg.size // 4
            x[y == 1, :, c:-c, c:-c] = 220
            return ArrayDataset(x, y, "binary", ["empty", "square"], np.array([f"{tag}{i}" for i in range(n)]),
                                name=tag)

        return SplitData(split(32, "train"), split(12, "val"), split(12, "test"), "synthetic (test source)")


@pytest.fixture
def toy_source():
    register_source(ToySource)
    try:
        yield get_source("toy_squares")
    finally:
        unregister_source("toy_squares")


def _cfg(tmp_path, source="toy_squares", **data):
    return config_from_dict({
        "name": "toy", "seed": 0, "output_dir": str(tmp_path),
        "data": {"source": source, "size": 16, **data},
        "model": {"name": "small_cnn", "params": {"widths": [4, 8]}},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.003, "precision": "32"},
        "evaluation": {"bootstrap": 10}})


def test_a_registered_source_validates_and_trains(toy_source, tmp_path):
    from medlens.workflow.train import train

    assert "toy_squares" in [s.name for s in list_sources()]
    cfg = _cfg(tmp_path)
    assert cfg.data.source == "toy_squares"
    # the source's own config rule and the shared ones (a prepared-array source refuses CLAHE) apply
    with pytest.raises(ConfigError, match="at least 8 pixels"):
        _cfg(tmp_path, size=4)
    with pytest.raises(ConfigError, match="'toy_squares' source holds prepared arrays"):
        _cfg(tmp_path, clahe=True)
    with pytest.raises(ConfigError, match="test_patient holds out one patient of a patch store"):
        _cfg(tmp_path, test_patient="p1")

    # the planner maps a file to the source that reads it
    from medlens.workflow.plan import base_config

    toy_file = tmp_path / "squares.toy"
    toy_file.write_text("")
    assert base_config(toy_file).data.source == "toy_squares"

    run = train(cfg, progress_bar=False, log=lambda s: None)
    assert ToySource.loaded >= 1
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete", meta.get("status")
    assert meta["class_names"] == ["empty", "square"]
    assert meta["split_method"].startswith("synthetic (test source)")
    assert meta["n_samples"] == {"train": 32, "val": 12, "test": 12}, meta["n_samples"]
    assert "toy_squares" in (run / "config.yaml").read_text()
    rows = (run / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 + 12 and any(r.startswith("test,") and ",test0," in r for r in rows)


def test_an_unregistered_source_is_refused_with_did_you_mean(toy_source, tmp_path):
    unregister_source("toy_squares")
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path)
    assert "unknown data source 'toy_squares'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, source="fodler", path="x")
    line = str(e.value)
    assert "data.source" in line and "did you mean 'folder'?" in line and "\n" not in line
    from medlens.errors import DataError
    from medlens.workflow.plan import base_config

    toy_file = tmp_path / "squares.toy"
    toy_file.write_text("")
    with pytest.raises(DataError, match="not a dataset the planner reads"):
        base_config(toy_file)


def test_a_source_registered_twice_is_refused(toy_source):
    with pytest.raises(ValueError, match="registered twice"):
        register_source(ToySource)


def test_every_dataset_class_satisfies_the_protocol(tmp_path):
    import h5py

    from medlens.data.nodules import PatchStoreDataset

    a = ArrayDataset(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]), "binary", ["a", "b"])
    assert isinstance(a, Dataset)
    store = tmp_path / "p.h5"
    with h5py.File(store, "w") as f:
        f["patches"] = np.zeros((2, 1, 4, 4, 4), np.int16)
        f["labels"] = np.array([0, 1])
        f["seriesuid"] = np.array([b"s1", b"s2"])
        f["patient_id"] = np.array([b"p1", b"p2"])
        f["world_mm"] = np.zeros((2, 3))
    p = PatchStoreDataset(store)
    assert isinstance(p, Dataset)
    x, y = p.batch([0, 1])
    assert tuple(x.shape) == (2, 1, 4, 4, 4) and y.tolist() == [0, 1]
    assert not isinstance(object(), Dataset)   # the check is real: a class without the members fails
