"""Explanations of trained runs on real data: every method, 2D (PneumoniaMNIST) and 3D (AdrenalMNIST3D)."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from medlens.config import load_config
from medlens.data import build_data
from medlens.engine.predict import load_run_model
from medlens.engine.train import train
from medlens.explain import METHODS, explain


@pytest.fixture(scope="module")
def pneumonia_batch(trained_run):
    net, meta = load_run_model(trained_run)
    cfg = load_config(trained_run / "config.yaml")
    x, y = build_data(cfg.data, seed=0).test.batch(np.arange(3))
    return net, x


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_a_2d_run(pneumonia_batch, method):
    net, x = pneumonia_batch
    m1, info = explain(net, x, method, target=1)
    m0, _ = explain(net, x, method, target=0)
    assert m1.shape == (3, 28, 28) and np.isfinite(m1).all() and np.abs(m1).sum() > 0
    assert not np.allclose(m0, m1)  # the map depends on the class explained


@pytest.fixture(scope="module")
def adrenal_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("adrenal")
    return train(tiny_config(tmp, "adrenal", data={"source": "medmnist", "name": "adrenalmnist3d", "max_samples": 120},
                             model={"name": "fast_cnn3d", "params": {"widths": [4, 8, 8, 16]}}), progress_bar=False)


def test_every_3d_method_on_an_adrenal_run(adrenal_run):
    net, meta = load_run_model(adrenal_run)
    cfg = load_config(adrenal_run / "config.yaml")
    x, _ = build_data(cfg.data, seed=0).test.batch(np.arange(2))
    for method, m in METHODS.items():
        if 3 not in m.dims:
            continue
        maps, _ = explain(net, x, method, n_samples=60) if method in ("lime", "kernelshap") else explain(net, x, method)
        assert maps.shape == (2, 28, 28, 28) and np.isfinite(maps).all(), method


def test_report_has_explanations_and_feature_views(trained_run, tmp_path):
    from medlens.explain.features import write_feature_views
    from medlens.explain.run import explain_files

    html = (trained_run / "report.html").read_text()
    assert "<h2>Explanations</h2>" in html and "False negatives" in html and "True positives" in html
    net, meta = load_run_model(trained_run)
    x = torch.rand(1, 1, 28, 28)
    paths = write_feature_views(net.net, x, tmp_path / "fv")
    assert (tmp_path / "fv" / "filters.png").exists() and len(paths) == 1 + 6  # filters + 6 conv layers
    from PIL import Image

    from medlens.data.medmnist import load_medmnist

    test = load_medmnist("pneumoniamnist").test
    Image.fromarray(test.images[0, 0]).save(tmp_path / "xray.png")
    rows = explain_files(trained_run, [tmp_path / "xray.png"], "gradcam", out_dir=tmp_path / "ex")
    assert np.load(rows[0]["npy"]).shape == (28, 28) and (tmp_path / "ex" / "xray_gradcam.png").exists()
