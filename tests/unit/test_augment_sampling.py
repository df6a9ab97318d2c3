import math

import numpy as np
import pytest
import torch

from medlens.config import AugmentConfig
from medlens.engine.sampling import EpochBatchSampler
from medlens.transforms.augment import BatchAugment, affine


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


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """The affine part alone, at a chosen angle (no zoom, no shift)."""
    b, nd = x.shape[0], x.ndim - 2
    return affine(x, torch.full((b,), math.radians(degrees)), torch.ones(b), torch.zeros(b, nd))


def _blob(h: int, w: int, cy: float, cx: float, sigma: float = 1.5) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _centroid(img: torch.Tensor) -> np.ndarray:
    w = img.double().clamp_min(0)
    yy, xx = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in img.shape], indexing="ij")
    return np.array([float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())])


def test_affine_rotation_by_90_degrees_is_rot90_on_a_square():
    x = torch.rand(2, 1, 16, 16)
    turned = _rotate(x, 90)
    matches = [torch.allclose(turned, torch.rot90(x, k, dims=(-2, -1)), atol=1e-4) for k in (1, 3)]
    assert sum(matches) == 1  # exactly one of the two quarter turns, pixel for pixel


def test_affine_rotation_is_rigid_on_a_non_square_image():
    h, w = 40, 80
    # a 24 x 6 pixel bar (wide along x) in the middle of a wide image
    bar = torch.zeros(1, 1, h, w)
    bar[0, 0, 17:23, 28:52] = 1
    turned = _rotate(bar, 90)[0, 0] > 0.5
    rows, cols = np.flatnonzero(turned.any(1)), np.flatnonzero(turned.any(0))
    assert (len(rows), len(cols)) == (24, 6)  # the bar stands upright with its own side lengths
    assert int(turned.sum()) == 24 * 6
    # two blobs 30 px apart keep their distance under an arbitrary rotation
    a, b = (14.0, 25.0), (26.0, 52.0)
    pair = torch.stack([_blob(h, w, *a), _blob(h, w, *b)])[:, None].float()
    before = np.linalg.norm(np.subtract(a, b))
    for degrees in (37.0, -65.0):
        out = _rotate(pair, degrees)
        after = np.linalg.norm(_centroid(out[0, 0]) - _centroid(out[1, 0]))
        assert after == pytest.approx(before, abs=0.15), degrees


def test_affine_rotation_is_rigid_in_3d_slices():
    d, h, w = 4, 30, 60
    bar = torch.zeros(1, 1, d, h, w)
    bar[0, 0, :, 12:18, 20:40] = 1
    turned = _rotate(bar, 90)[0, 0, 2] > 0.5
    assert (len(np.flatnonzero(turned.any(1))), len(np.flatnonzero(turned.any(0)))) == (20, 6)


def test_rot90_on_non_square_inputs_turns_by_0_or_180_degrees():
    aug = BatchAugment(AugmentConfig(rot90=True))
    x = torch.rand(32, 2, 6, 10)
    y = aug(x, torch.Generator().manual_seed(0))
    k = aug.last_params["geometric"].rot90
    assert y.shape == x.shape and set(k.tolist()) == {0, 2}  # both happen, nothing else
    for i in range(len(x)):
        assert torch.equal(y[i], x[i] if k[i] == 0 else x[i].flip(-1).flip(-2))
    sq = torch.rand(64, 1, 8, 8)
    y = aug(sq, torch.Generator().manual_seed(0))
    k = aug.last_params["geometric"].rot90
    assert set(k.tolist()) == {0, 1, 2, 3}
    assert all(torch.equal(y[i], torch.rot90(sq[i], int(k[i]), dims=(-2, -1))) for i in range(len(sq)))


def test_brightness_is_scaled_by_each_sample_own_range():
    aug = BatchAugment(AugmentConfig(brightness=0.2))
    x = torch.stack([torch.rand(1, 16, 16), 100 * torch.rand(1, 16, 16)])
    x[0, 0, 0, :2], x[1, 0, 0, :2] = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 100.0])  # ranges 1 and 100
    y = aug(x, torch.Generator().manual_seed(5))
    shift = (y - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)  # one shift per sample
    bias = aug.last_params["intensity"].bias
    assert bias[0] != bias[1]
    assert torch.allclose(shift[:, 0], bias * torch.tensor([1.0, 100.0]), atol=1e-4)
    assert abs(float(shift[0, 0])) <= 0.2  # never more than 20 % of the first sample's own range


def test_noise_is_scaled_by_each_sample_own_std():
    aug = BatchAugment(AugmentConfig(noise=0.5))
    x = torch.stack([torch.rand(1, 64, 64), 100 * torch.rand(1, 64, 64)])
    y = aug(x, torch.Generator().manual_seed(2))
    p = aug.last_params["intensity"]
    measured = (y - x).flatten(1).std(1)
    expected = p.sigma * x.flatten(1).std(1)
    assert torch.allclose(measured, expected, rtol=0.05)
    assert measured[0] <= 0.5 * x[0].std() * 1.05  # the first sample's noise follows its own std
    assert p.sigma[0] != p.sigma[1]
