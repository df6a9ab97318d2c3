"""Reconstruction: CT from projections (Radon, FBP, SART; scikit-image) and MRI from k-space."""

from __future__ import annotations

import numpy as np
from skimage.transform import iradon, iradon_sart, radon

from medlens.errors import ShapeError
from medlens.imaging._common import as_array, positive


def forward_project(slice_2d, n_angles: int = 180) -> tuple[np.ndarray, np.ndarray]:
    """Parallel-beam sinogram of a 2D slice over ``n_angles`` angles in [0, 180)."""
    a = as_array(slice_2d).astype(np.float64)
    if a.ndim != 2:
        raise ShapeError(f"forward projection needs a 2D slice, got {a.shape}")
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    return radon(a, theta=theta, circle=False), theta


def fbp(sinogram: np.ndarray, theta: np.ndarray, size: int | None = None, filter_name: str = "ramp") -> np.ndarray:
    """Filtered back-projection."""
    return iradon(sinogram, theta=theta, output_size=size, filter_name=filter_name, circle=False)


def center_crop(img: np.ndarray, shape) -> np.ndarray:
    """The centred ``shape`` window of a larger reconstruction (a full-diagonal grid)."""
    off = [(n - s) // 2 for n, s in zip(img.shape, shape)]
    return img[tuple(slice(o, o + s) for o, s in zip(off, shape))]


def sart(sinogram: np.ndarray, theta: np.ndarray, iterations: int = 2, size: int | None = None) -> np.ndarray:
    """Simultaneous algebraic reconstruction (SART), ``iterations`` passes; centre-cropped to ``size``."""
    positive(iterations, "SART iterations")
    rec = np.asarray(iradon_sart(sinogram.astype(np.float64), theta=theta))
    for _ in range(iterations - 1):
        rec = np.asarray(iradon_sart(sinogram.astype(np.float64), theta=theta, image=rec))
    return center_crop(rec, (size, size)) if size else rec


def kspace(slice_2d) -> np.ndarray:
    """Centred 2D k-space (FFT) of an image."""
    return np.fft.fftshift(np.fft.fft2(as_array(slice_2d).astype(np.float64)))


def undersampled_recon(slice_2d, acceleration: int = 2, center_fraction: float = 0.08, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-filled reconstruction from Cartesian k-space keeping every ``acceleration``-th phase-encode
    line plus a fully sampled centre (random offset); returns (image magnitude, line mask)."""
    k = kspace(slice_2d)
    ny = k.shape[0]
    rng = np.random.default_rng(seed)
    lines = np.zeros(ny, bool)
    lines[rng.integers(acceleration)::acceleration] = True
    c = int(round(ny * center_fraction / 2))
    lines[ny // 2 - c: ny // 2 + c] = True
    rec = np.abs(np.fft.ifft2(np.fft.ifftshift(k * lines[:, None])))
    return rec, lines
