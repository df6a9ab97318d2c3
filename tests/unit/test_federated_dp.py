"""Issue 15: client-side DP-SGD (Opacus) in a site's local step: the epsilon a site reports is the one Opacus'
own RDP accountant gives for the same noise, sampling rate and number of steps, composed over rounds; a model
DP-SGD cannot train is refused in one line."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from medlens.config import config_from_dict
from medlens.data.base import ArrayDataset
from medlens.engine.federated import local_fit
from medlens.engine.train import build_network
from medlens.errors import ConfigError

CFG = config_from_dict({"name": "dp", "data": {"source": "medmnist", "name": "pneumoniamnist"},
                        "model": {"name": "dicom_tutorial_cnn"},
                        "train": {"batch_size": 16, "lr": 0.01, "precision": "32"}}).train
DP = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}


def _ds(n=64):
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 255, (n, 1, 16, 16), dtype=np.uint8), (np.arange(n) % 2).reshape(-1, 1),
                        "binary", ["a", "b"])


def test_epsilon_matches_opacus_accountant_over_rounds():
    torch.manual_seed(0)
    net = build_network("dicom_tutorial_cnn", 1, 1, 2, (16, 16), {"dense": 16}, [0.0], [1.0])
    engine = PrivacyEngine(accountant="rdp")
    eps = [local_fit(net, _ds(), CFG, "binary", 0, r, 1, privacy=DP, privacy_engine=engine)["epsilon"]
           for r in (1, 2)]
    ref = RDPAccountant()
    for _ in range(2 * 4):  # 2 rounds x 4 steps of 16 out of 64
        ref.step(noise_multiplier=1.1, sample_rate=16 / 64)
    assert eps[0] < eps[1]
    assert eps[1] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)


def test_batchnorm_model_is_refused_in_one_line():
    net = build_network("small_cnn", 1, 1, 2, (16, 16), {"widths": [4, 8, 8]}, [0.0], [1.0])
    with pytest.raises(ConfigError) as e:
        local_fit(net, _ds(), CFG, "binary", 0, 1, 1, privacy=DP)
    assert "\n" not in str(e.value) and "BatchNorm" in str(e.value)
