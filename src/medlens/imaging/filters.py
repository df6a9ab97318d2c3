"""Spatial and frequency-domain filters (2D and 3D)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medlens.errors import ConfigError
from medlens.imaging._common import ImageLike, as_array, like, positive


def gaussian(x: ImageLike, sigma: float = 1.0) -> ImageLike:
    positive(sigma, "gaussian sigma", allow_zero=np.ndim(sigma) > 0)  # per-axis sigmas may skip an axis
    return like(x, ndimage.gaussian_filter(as_array(x).astype(np.float32), sigma))


def median(x: ImageLike, size: int = 3) -> ImageLike:
    positive(size, "median size")
    return like(x, ndimage.median_filter(as_array(x), size=size))


def bilateral(x: ImageLike, sigma_spatial: float = 2.0, sigma_range: float | None = None) -> ImageLike:
    """Edge-preserving bilateral filter (SimpleITK; 2D or 3D); ``sigma_range`` defaults to 10% of the range."""
    positive(sigma_spatial, "bilateral spatial sigma")
    a = as_array(x).astype(np.float32)
    sr = sigma_range if sigma_range is not None else 0.1 * float(np.ptp(a) or 1.0)
    out = sitk.GetArrayFromImage(sitk.Bilateral(sitk.GetImageFromArray(a), sigma_spatial, sr))
    return like(x, out)


def anisotropic_diffusion(x: ImageLike, iterations: int = 10, conductance: float = 3.0,
                          time_step: float | None = None) -> ImageLike:
    """Perona-Malik curvature-anisotropic diffusion (SimpleITK)."""
    positive(iterations, "diffusion iterations")
    positive(conductance, "diffusion conductance")
    a = as_array(x).astype(np.float32)
    ts = time_step if time_step is not None else (0.0625 if a.ndim == 3 else 0.125)
    out = sitk.CurvatureAnisotropicDiffusion(sitk.GetImageFromArray(a), timeStep=ts, conductanceParameter=conductance,
                                             numberOfIterations=iterations)
    return like(x, sitk.GetArrayFromImage(out))


def fft_filter(x: ImageLike, kind: str = "lowpass", cutoff: float = 0.1, high: float | None = None,
               order: int = 2) -> ImageLike:
    """Butterworth low/high/band-pass in the Fourier domain; cutoffs are fractions of the Nyquist frequency."""
    positive(cutoff, "FFT cutoff")
    a = as_array(x).astype(np.float32)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) * 2 for n in a.shape], indexing="ij")
    r = np.sqrt(sum(f ** 2 for f in freqs))
    lp = lambda c: 1.0 / (1.0 + (r / max(c, 1e-6)) ** (2 * order))  # noqa: E731
    if kind == "lowpass":
        h = lp(cutoff)
    elif kind == "highpass":
        h = 1.0 - lp(cutoff)
    elif kind == "bandpass":
        h = lp(high if high is not None else 2 * cutoff) * (1.0 - lp(cutoff))
    else:
        raise ConfigError(f"unknown FFT filter '{kind}'; expected lowpass, highpass or bandpass")
    return like(x, np.real(np.fft.ifftn(np.fft.fftn(a) * h)).astype(np.float32))
