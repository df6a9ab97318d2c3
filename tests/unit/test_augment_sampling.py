import numpy as np
import torch

from medlens.config import AugmentConfig
from medlens.engine.sampling import EpochBatchSampler
from medlens.transforms.augment import BatchAugment


def _aug():
    return BatchAugment(AugmentConfig(hflip=0.5, vflip=0.5, rotate=20, translate=0.1, scale=0.1, brightness=0.1,
                                      contrast=0.1, noise=0.05))


def test_augment_is_reproducible_and_shape_preserving():
    x = torch.rand(16, 1, 28, 28)
    a = _aug()(x, torch.Generator().manual_seed(3))
    b = _aug()(x, torch.Generator().manual_seed(3))
    c = _aug()(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)


def test_augment_3d():
    x = torch.rand(4, 1, 12, 16, 16)
    y = _aug()(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(x, y)


def test_no_augmentation_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert BatchAugment(AugmentConfig())(x, torch.Generator()) is x


def test_sampler_epochs_are_deterministic_and_differ():
    labels = np.array([0] * 90 + [1] * 10)
    s = EpochBatchSampler(labels, "binary", 32, "shuffle", seed=1)
    s.set_epoch(0); e0 = np.concatenate(list(s))
    s.set_epoch(1); e1 = np.concatenate(list(s))
    s.set_epoch(0); e0b = np.concatenate(list(s))
    assert np.array_equal(e0, e0b) and not np.array_equal(e0, e1)
    assert sorted(e0.tolist()) == list(range(100))


def test_balanced_and_undersampled_sampling():
    labels = np.array([0] * 900 + [1] * 100)
    bal = np.concatenate(list(EpochBatchSampler(labels, "binary", 100, "balanced", seed=0)))
    frac = labels[bal].mean()
    assert 0.45 < frac < 0.55
    und = EpochBatchSampler(labels, "binary", 64, "undersample", seed=0, undersample_ratio=5)
    idx = np.concatenate(list(und))
    assert (labels[idx] == 1).sum() == 100 and (labels[idx] == 0).sum() == 500 and len(und) == 10
