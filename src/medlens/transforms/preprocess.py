"""Turn an ``Image`` into a model input array: colour mode, intensity scaling, size."""

from __future__ import annotations

import numpy as np

from medlens.errors import DataError, ShapeError
from medlens.io.image import Image

COLOR_MODES = ("gray", "rgb", "green")


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Scale to float32 [0, 1]: uint8 by 1/255, other types by their own min/max."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    a = arr.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError("image holds no finite values")
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def green_channel(rgb: np.ndarray) -> np.ndarray:
    """The green channel of an (..., 3) RGB array: the best vessel/lesion contrast in fundus photos."""
    if rgb.shape[-1] != 3:
        raise ShapeError(f"green channel needs an RGB image (..., 3), got {rgb.shape}")
    return rgb[..., 1]


def set_color(image: Image, color: str) -> np.ndarray:
    """Array (y, x, C) in the requested colour mode."""
    if color not in COLOR_MODES:
        raise DataError(f"unknown colour mode '{color}'; expected one of {COLOR_MODES}")
    arr = image.array
    if image.spatial_dims != 2:
        raise ShapeError(f"expected a 2D image, got {image.spatial_dims}D of shape {arr.shape}")
    if image.is_rgb:
        if color == "rgb":
            return arr
        if color == "green":
            return green_channel(arr)[..., None]
        w = np.array([0.299, 0.587, 0.114], np.float32)
        gray = arr.astype(np.float32) @ w
        return (np.round(gray).astype(arr.dtype) if arr.dtype == np.uint8 else gray)[..., None]
    if color == "rgb":
        return np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., None]  # gray or green of a gray image: the image itself


def resize2d(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize (y, x, C) with area interpolation when shrinking, cubic when enlarging."""
    import cv2

    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr
    interp = cv2.INTER_AREA if arr.shape[0] > h else cv2.INTER_CUBIC
    out = cv2.resize(arr, (w, h), interpolation=interp)
    return out if out.ndim == 3 else out[..., None]


def prepare_2d(image: Image, size: int | tuple[int, int], color: str = "gray") -> np.ndarray:
    """Model input (C, H, W): colour mode, resize, keep uint8 if the source is 8-bit else float [0, 1]."""
    arr = set_color(image, color)
    if arr.dtype != np.uint8:
        arr = to_unit_range(arr)
    arr = resize2d(arr, size)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
