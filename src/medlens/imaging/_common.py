"""Shared argument handling for ``medlens.imaging``: functions accept an ``Image`` or an array."""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from medlens.errors import ConfigError, DataError, ShapeError
from medlens.io.image import Image


#: what the filters take and give back: an ``Image`` gives an ``Image`` on the same grid, an array an array
ImageLike = TypeVar("ImageLike", Image, np.ndarray)


def as_array(x, name: str = "image", finite: bool = True) -> np.ndarray:
    a = x.array if isinstance(x, Image) else np.asarray(x)
    if a.size == 0:
        raise ShapeError(f"{name} is empty")
    if finite and np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DataError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN/inf)")
    return a


def like(x: ImageLike, arr: np.ndarray) -> ImageLike:
    """Return ``arr`` in the type of ``x``: an ``Image`` on the same grid, or a plain array."""
    if isinstance(x, Image):
        return x.with_array(arr)
    return arr


def check_mask(image: np.ndarray, mask, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask.array if isinstance(mask, Image) else mask)
    if m.shape != image.shape[: m.ndim] or m.ndim != image.ndim:
        raise ShapeError(f"{name} grid {m.shape} differs from the image grid {image.shape}")
    m = m.astype(bool)
    if not m.any():
        raise DataError(f"{name} is empty (no foreground voxel)")
    return m


def positive(value, what: str, allow_zero: bool = False):
    """A strength, size or count: a finite number > 0 (or >= 0), else one ConfigError line."""
    v = np.asarray(value, float)
    if v.size == 0 or not np.all(np.isfinite(v)) or np.any(v < 0) or (not allow_zero and np.any(v == 0)):
        raise ConfigError(f"{what} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return value
