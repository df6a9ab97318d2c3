"""``imaging.nodules.log_blobs`` (the LoG blobs of nodule detection) against scikit-image's ``blob_log``, the
independent reference: the same rows in the same order, on synthetic images of many overlapping Gaussian blobs of
several sizes plus noise, where the overlap pruning has long chains of overlapping blobs to resolve."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import blob_log

from medlens.imaging.nodules import _log_blobs, log_blobs


def _blobs_image(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """``n`` Gaussian blobs of sigma 1-4 voxels and random brightness at random places (many overlap), plus
    Gaussian noise, float32 like the CT grid nodule detection filters."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        c = rng.uniform(0, np.array(shape), size=len(shape)).astype(np.float32)
        s = np.float32(rng.choice([1.0, 1.5, 2.5, 4.0]))
        r2 = sum((g - v) ** 2 for g, v in zip(grid, c))
        img += np.float32(rng.uniform(0.3, 1.0)) * np.exp(-r2 / (2 * s * s))
    img += rng.normal(0, 0.05, shape).astype(np.float32)
    return img


# The seeds are chosen so that the pruning's result depends on its pair order (a blob that removes one and is
# removed by another): walking the pairs in scipy's array order, or reversed, or letting removed blobs remove,
# gives different rows in at least one case per dimension.
@pytest.mark.parametrize(("shape", "seed", "min_sigma", "max_sigma", "num_sigma", "threshold", "overlap"), [
    ((40, 48, 48), 2, 0.8, 5.0, 6, 0.04, 0.5),  # nodule detection's settings on a smaller grid
    ((40, 48, 48), 2, 0.8, 5.0, 6, 0.1, 0.2),
    ((160, 160), 25, 0.8, 6.0, 7, 0.03, 0.5),
    ((160, 160), 21, 1.0, 5.0, 5, 0.08, 0.1),
])
def test_log_blobs_are_blob_logs(shape, seed, min_sigma, max_sigma, num_sigma, threshold, overlap):
    img = _blobs_image(shape, 300, seed)
    ours = log_blobs(img, min_sigma, max_sigma, num_sigma=num_sigma, threshold=threshold, overlap=overlap)
    ref = blob_log(img, min_sigma=min_sigma, max_sigma=max_sigma, num_sigma=num_sigma, threshold=threshold,
                   overlap=overlap, exclude_border=False)
    assert ref.shape[1] == len(shape) + 1 and len(ref) > 50  # a real test: many blobs survive the pruning
    assert ours.dtype == ref.dtype
    np.testing.assert_array_equal(ours, ref)  # the same rows in the same order, bit for bit


def test_the_scale_space_is_scipys_laplacian_of_gaussian_to_the_bit():
    """The blobs' responses (nodule detection ranks its candidates by them) are ``-s^2`` times
    ``scipy.ndimage.gaussian_laplace`` at the blob, bit for bit, although the filter shares one of its passes."""
    img = _blobs_image((40, 48, 48), 300, seed=2)
    blobs, response, _ = _log_blobs(img, 0.8, 5.0, 6, 0.04, 0.5)
    sigmas = np.linspace(np.full(3, 0.8, np.float32), np.full(3, 5.0, np.float32), 6)
    expected = np.empty_like(response)
    for s in sigmas:
        rows = blobs[:, 3] == s[0]
        lap = ndimage.gaussian_laplace(img, s)
        expected[rows] = -lap[tuple(blobs[rows, :3].astype(int).T)] * np.mean(s) ** 2
    assert len(blobs) > 50
    np.testing.assert_array_equal(response, expected)
