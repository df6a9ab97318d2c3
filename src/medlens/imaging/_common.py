"""Shared argument handling for ``medlens.imaging``: functions accept an ``Image`` or an array."""

from __future__ import annotations

import numpy as np

from medlens.errors import DataError, ShapeError
from medlens.io.image import Image


def as_array(x, name: str = "image", finite: bool = True) -> np.ndarray:
    a = x.array if isinstance(x, Image) else np.asarray(x)
    if a.size == 0:
        raise ShapeError(f"{name} is empty")
    if finite and np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DataError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN/inf)")
    return a


def like(x, arr: np.ndarray):
    """Return ``arr`` in the type of ``x``: an ``Image`` on the same grid, or a plain array."""
    return x.with_array(arr) if isinstance(x, Image) else arr


def check_mask(image: np.ndarray, mask, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask.array if isinstance(mask, Image) else mask)
    if m.shape != image.shape[: m.ndim] or m.ndim != image.ndim:
        raise ShapeError(f"{name} grid {m.shape} differs from the image grid {image.shape}")
    m = m.astype(bool)
    if not m.any():
        raise DataError(f"{name} is empty (no foreground voxel)")
    return m
