"""The anomaly autoencoder's score and maps, against numpy."""

import numpy as np
import pytest
import torch

from medlens.errors import ConfigError
from medlens.models import create_model


def test_error_maps_scores_and_logit_match_numpy():
    torch.manual_seed(0)
    net = create_model("autoencoder", 1, 1, 2, (28, 28)).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        r = net.reconstruct(x).numpy()
        xs = x.numpy()
        assert np.allclose(net.error_map(x, "mse").numpy(), ((xs - r) ** 2)[:, 0], atol=1e-6)
        assert np.allclose(net.error_map(x, "l1").numpy(), np.abs(xs - r)[:, 0], atol=1e-6)
        train_scores = torch.tensor([0.01, 0.02, 0.04])
        net.standardise(train_scores)
        logit = net(x).numpy()[:, 0]
    lt = np.log(train_scores.numpy().astype(np.float64) + 1e-8)
    want = (np.log(((xs - r) ** 2).reshape(3, -1).mean(1) + 1e-8) - lt.mean()) / lt.std(ddof=1)
    assert np.allclose(logit, want, rtol=1e-4)


def test_ssim_dissimilarity_is_zero_for_a_perfect_reconstruction():
    net = create_model("autoencoder", 1, 1, 2, (28, 28), score="ssim").eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(net.raw_score(x, recon=x.clone()), torch.zeros(2), atol=1e-5)
    assert (net.raw_score(x, recon=torch.rand(2, 1, 28, 28)) > 0.5).all()  # unrelated noise: SSIM near 0


@pytest.mark.parametrize("dims, kw", [(2, {"latent_size": 16}), (3, {"channels": [4, 8], "strides": [2, 2]})])
def test_variational_and_3d_autoencoders(dims, kw):
    net = create_model("autoencoder", 1, 1, dims, (16,) * dims, **kw).eval()
    out = net(torch.rand((2, 1) + (16,) * dims))
    assert out.shape == (2, 1) and torch.isfinite(out).all()


def test_a_decoder_that_misses_the_input_grid_is_a_config_error():
    with pytest.raises(ConfigError, match=r"reconstruct \[32, 32\] from \[28, 28\]"):
        create_model("autoencoder", 1, 1, 2, (28, 28), channels=[8, 8, 8], strides=[2, 2, 2])
