"""Noise reduction: median, wavelet (BayesShrink / VisuShrink), non-local means, total variation."""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy import ndimage
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, denoise_wavelet, estimate_sigma

from medlens.imaging._common import ImageLike, as_array, like


def _scaled(a: np.ndarray):
    lo, hi = float(a.min()), float(a.max())
    s = (hi - lo) or 1.0
    return (a - lo) / s, lo, s


def _noise_sigma(a: np.ndarray) -> float:
    """The estimated Gaussian noise sigma of a one-channel image (scikit-image types the result for
    multichannel images too, where it is a list)."""
    return float(cast(float, estimate_sigma(a)))


def median(x: ImageLike, size: int = 3) -> ImageLike:
    return like(x, ndimage.median_filter(as_array(x).astype(np.float32), size=size))


def wavelet(x: ImageLike, method: str = "BayesShrink", wavelet: str = "db2", sigma: float | None = None) -> ImageLike:
    """Wavelet shrinkage (scikit-image + PyWavelets); ``method`` BayesShrink or VisuShrink."""
    a, lo, s = _scaled(as_array(x).astype(np.float64))
    sig = (sigma / s) if sigma is not None else estimate_sigma(a)
    out = denoise_wavelet(a, sigma=sig, wavelet=wavelet, method=method, mode="soft", rescale_sigma=True)
    return like(x, (out * s + lo).astype(np.float32))


def nlm(x: ImageLike, h: float | None = None, patch_size: int = 5, patch_distance: int = 6,
        sigma: float | None = None) -> ImageLike:
    """Non-local means (scikit-image, fast mode); ``h`` defaults to 0.8 x the estimated noise sigma."""
    a, lo, s = _scaled(as_array(x).astype(np.float64))
    sig = (sigma / s) if sigma is not None else _noise_sigma(a)
    out = denoise_nl_means(a, h=h if h is not None else 0.8 * sig, sigma=sig, patch_size=patch_size,
                           patch_distance=patch_distance, fast_mode=True)
    return like(x, (out * s + lo).astype(np.float32))


def total_variation(x: ImageLike, weight: float | None = None, sigma: float | None = None) -> ImageLike:
    """Chambolle total-variation denoising (scikit-image); weight defaults from the noise sigma."""
    a, lo, s = _scaled(as_array(x).astype(np.float64))
    sig = (sigma / s) if sigma is not None else _noise_sigma(a)
    out = denoise_tv_chambolle(a, weight=weight if weight is not None else 1.2 * sig)
    return like(x, (out * s + lo).astype(np.float32))
