"""Enhancement: window/level, contrast stretching, histogram equalisation, CLAHE, unsharp masking."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_hist, rescale_intensity

from medlens.imaging._common import ImageLike, as_array, like, positive
from medlens.io.windows import apply_window
from medlens.transforms.intensity import clahe as _clahe


def window(x: ImageLike, window="lung") -> ImageLike:
    """Window/level to [0, 1] (preset name, 'L,W' or (level, width))."""
    return like(x, apply_window(as_array(x), window))


def contrast_stretch(x: ImageLike, low_pct: float = 2.0, high_pct: float = 98.0) -> ImageLike:
    """Linear stretch of the [low, high] percentiles to [0, 1]."""
    a = as_array(x).astype(np.float32)
    lo, hi = np.percentile(a, [low_pct, high_pct])
    # scikit-image documents in_range/out_range as a name or a (min, max) pair; its annotation says str only
    out = rescale_intensity(a, in_range=(lo, hi), out_range=(0.0, 1.0))  # pyright: ignore[reportArgumentType]
    return like(x, out.astype(np.float32))


def equalize(x: ImageLike, nbins: int = 256) -> ImageLike:
    """Global histogram equalisation to [0, 1] (scikit-image)."""
    return like(x, equalize_hist(as_array(x).astype(np.float32), nbins=nbins).astype(np.float32))


def clahe(x: ImageLike, clip_limit: float = 2.0, tile: int = 8) -> ImageLike:
    """Contrast-limited adaptive histogram equalisation (OpenCV; 2D gray or RGB)."""
    positive(clip_limit, "CLAHE clip limit")
    positive(tile, "CLAHE tile count")
    return like(x, _clahe(as_array(x), clip_limit, tile))


def unsharp(x: ImageLike, radius: float = 2.0, amount: float = 1.0) -> ImageLike:
    """Unsharp masking: image + amount x (image - Gaussian(image))."""
    positive(radius, "unsharp radius")
    positive(amount, "unsharp amount", allow_zero=True)
    a = as_array(x).astype(np.float32)
    return like(x, a + amount * (a - ndimage.gaussian_filter(a, radius)))
