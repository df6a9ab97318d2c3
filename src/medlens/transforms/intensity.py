"""Intensity transforms: normalisation and CLAHE (HU windows live in ``medlens.io.windows``)."""

from __future__ import annotations

import cv2
import numpy as np

from medlens.errors import ConfigError
from medlens.io.windows import to_uint8


def normalize(arr: np.ndarray, method: str = "zscore", mask: np.ndarray | None = None,
              percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """``zscore`` (mean 0, std 1), ``minmax`` ([0, 1]) or ``percentile`` ([0, 1] between percentiles, clipped)."""
    a = np.asarray(arr, np.float32)
    ref = a[mask.astype(bool)] if mask is not None else a
    if method == "zscore":
        return (a - ref.mean()) / max(float(ref.std()), 1e-8)
    if method == "minmax":
        lo, hi = float(ref.min()), float(ref.max())
        return (a - lo) / max(hi - lo, 1e-8)
    if method == "percentile":
        lo, hi = np.percentile(ref, percentiles)
        return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)
    raise ConfigError(f"unknown normalisation '{method}'; expected zscore, minmax or percentile")


def clahe(arr: np.ndarray, clip_limit: float = 2.0, tile: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a 2D gray or RGB (y, x, 3) uint8 image.

    For RGB, CLAHE is applied to the L channel in Lab space so colours are preserved.
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = to_uint8(a)
    op = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile))
    if a.ndim == 3 and a.shape[-1] == 3:
        lab = cv2.cvtColor(a, cv2.COLOR_RGB2LAB)
        lab[..., 0] = op.apply(lab[..., 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return op.apply(a)
