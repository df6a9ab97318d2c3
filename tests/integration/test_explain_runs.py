"""Explanations of trained runs on real data: every method, 2D (PneumoniaMNIST) and 3D (AdrenalMNIST3D)."""


import numpy as np
import pytest
import torch

from conftest import tiny_config
from medlens.data import build_data
from medlens.explain import METHODS, explain
from medlens.explain.methods import TwoClass, reference, superpixels
from medlens.run import Run
from medlens.workflow.train import train

# Binary runs are explained through TwoClass: class 0 scores -z/2, class 1 scores +z/2. Methods linear in
# the explained score therefore give class 0 exactly the negated map of class 1.
SIGNED_LINEAR = {"saliency", "smoothgrad", "integrated_gradients", "occlusion"}
RELU_CAMS = {"gradcam", "gradcam++", "layercam", "cam"}  # ReLU'd class activation maps: never negative
SUPERPIXEL = {"lime", "kernelshap"}  # one weight per SLIC superpixel (40 requested)


def _test_batch(run_dir, n):
    run = Run.open(run_dir)
    x, _ = build_data(run.config.data, seed=0).test.batch(np.arange(n))
    return run.model, x


@pytest.fixture(scope="module")
def pneumonia_batch(trained_run):
    return _test_batch(trained_run, 3)


def _check_map_properties(net, x, maps, method, target):
    """Properties that hold for any correct map of ``method`` (``target``: one class for the batch)."""
    if method in RELU_CAMS:
        assert maps.min() >= 0, method
    if method in SUPERPIXEL:
        for xi, mi in zip(x, maps):
            assert len(np.unique(mi)) <= len(np.unique(superpixels(xi.numpy(), 40))), method
    if method == "integrated_gradients":  # completeness: attributions sum to score(x) - score(reference)
        with torch.no_grad():
            score = TwoClass(net)(x)[:, target] - TwoClass(net)(reference(x))[:, target]
        sums = maps.reshape(len(x), -1).sum(1)
        assert np.allclose(sums, score.numpy(), rtol=0.05, atol=1e-3 * float(score.abs().max())), (sums, score)


@pytest.mark.parametrize("method", [m for m, v in METHODS.items() if not v.attention])  # CNN runs
def test_every_method_on_a_2d_run(pneumonia_batch, method):
    net, x = pneumonia_batch
    m1, info = explain(net, x, method, target=1)
    m0, _ = explain(net, x, method, target=0)
    assert m1.shape == (3, 28, 28) and m0.shape == (3, 28, 28)
    per_sample = (np.abs(m0) + np.abs(m1)).reshape(3, -1).sum(1)
    assert (per_sample > 0).all(), per_sample  # every image is explained by something, never a blank map
    assert not np.allclose(m0, m1)  # the map depends on the class explained
    if method in SIGNED_LINEAR:
        assert np.allclose(m0, -m1, rtol=1e-4, atol=1e-6 * np.abs(m1).max()), method
    _check_map_properties(net, x, m1, method, 1)
    _check_map_properties(net, x, m0, method, 0)


@pytest.fixture(scope="module")
def adrenal_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("adrenal")
    # the report names its method (the search over every method on 3D validation images is a minute that this
    # test does not read; test_calibration_honesty checks the search)
    return train(tiny_config(tmp, "adrenal", data={"source": "medmnist", "name": "adrenalmnist3d", "max_samples": 120},
                             model={"name": "fast_cnn3d", "params": {"widths": [4, 8, 8, 16]}},
                             explain={"method": "gradcam", "score_images": 4}), progress_bar=False)


def test_every_3d_method_on_an_adrenal_run(adrenal_run):
    net, x = _test_batch(adrenal_run, 2)
    for method, m in METHODS.items():
        if 3 not in m.dims or m.attention:  # attention: transformers only (tests/unit/test_vit_attention.py)
            continue
        kw = {"n_samples": 60} if method in SUPERPIXEL else {}
        # occlusion slides its window over the whole volume (2,197 occluded copies of each 28^3 volume for one
        # class, 6.4 s of CPU): one volume and one class here; the 2D test runs it on a batch for both classes
        # and checks the sign flip there
        xs = x[:1] if method == "occlusion" else x
        maps, info = explain(net, xs, method, target=1, **kw)
        assert maps.shape == (len(xs), 28, 28, 28), method
        if method in SIGNED_LINEAR:
            assert np.abs(maps).reshape(len(xs), -1).sum(1).min() > 0, method
        if method in SIGNED_LINEAR and method != "occlusion":
            other, _ = explain(net, xs, method, target=0, **kw)
            assert np.allclose(other, -maps, rtol=1e-4, atol=1e-6 * np.abs(maps).max()), method
        _check_map_properties(net, xs, maps, method, 1)


def test_report_has_explanations_and_feature_views(trained_run, tmp_path):
    from medlens.explain.features import write_feature_views
    from medlens.explain.run import explain_files

    html = (trained_run / "report.html").read_text()
    assert "<h2>Explanations</h2>" in html and "False negatives" in html and "True positives" in html
    net = Run.open(trained_run).model
    x = torch.rand(1, 1, 28, 28)
    paths = write_feature_views(net.net, x, tmp_path / "fv")
    assert (tmp_path / "fv" / "filters.png").exists() and len(paths) == 1 + 6  # filters + 6 conv layers
    from PIL import Image

    from medlens.data.medmnist import load_medmnist

    test = load_medmnist("pneumoniamnist").test
    Image.fromarray(test.images[0, 0]).save(tmp_path / "xray.png")
    rows = explain_files(trained_run, [tmp_path / "xray.png"], "gradcam", out_dir=tmp_path / "ex")
    assert np.load(rows[0]["npy"]).shape == (28, 28) and (tmp_path / "ex" / "xray_gradcam.png").exists()
