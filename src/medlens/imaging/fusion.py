"""Fusion of two registered images: alpha blending, checkerboard, wavelet fusion."""

from __future__ import annotations

import numpy as np
import pywt

from medlens.errors import ShapeError
from medlens.imaging._common import as_array


def _pair(a, b):
    a, b = as_array(a).astype(np.float32), as_array(b).astype(np.float32)
    if a.shape != b.shape:
        raise ShapeError(f"images must share a grid to be fused: {a.shape} vs {b.shape} (register first)")
    norm = lambda x: (x - x.min()) / (np.ptp(x) or 1.0)  # noqa: E731
    return norm(a), norm(b)


def alpha_blend(a, b, alpha: float = 0.5) -> np.ndarray:
    a, b = _pair(a, b)
    return (1 - alpha) * a + alpha * b


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    a, b = _pair(a, b)
    idx = np.indices(a.shape)
    board = sum((i * tiles // n) for i, n in zip(idx, a.shape)) % 2 == 0
    return np.where(board, a, b)


def wavelet_fusion(a, b, wavelet: str = "db2", level: int = 2) -> np.ndarray:
    """Average the approximation, keep the larger-magnitude detail coefficients (PyWavelets)."""
    a, b = _pair(a, b)
    ca = pywt.wavedecn(a, wavelet, level=level)
    cb = pywt.wavedecn(b, wavelet, level=level)
    fused = [(ca[0] + cb[0]) / 2]
    for da, db in zip(ca[1:], cb[1:]):
        fused.append({k: np.where(np.abs(da[k]) >= np.abs(db[k]), da[k], db[k]) for k in da})
    out = np.asarray(pywt.waverecn(fused, wavelet))
    return out[tuple(slice(0, n) for n in a.shape)].astype(np.float32)
