"""Intensity transforms: HU windows, normalisation, CLAHE (fundus helpers live in preprocess)."""

from __future__ import annotations

import numpy as np

from medlens.errors import ConfigError

# (level, width) in HU. Common radiology presets.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}


def parse_window(window) -> tuple[float, float]:
    """A preset name, ``"L,W"`` / ``"L/W"`` string or a ``(level, width)`` pair."""
    if isinstance(window, str):
        key = window.strip().lower()
        if key in WINDOWS:
            return WINDOWS[key]
        for sep in (",", "/", ":"):
            if sep in key:
                try:
                    level, width = (float(v) for v in key.split(sep))
                    break
                except ValueError:
                    pass
        else:
            raise ConfigError(f"unknown window '{window}'; presets: {', '.join(WINDOWS)}, or 'level,width'")
    else:
        level, width = (float(v) for v in window)
    if width <= 0:
        raise ConfigError(f"window width must be positive, got {width}")
    return level, width


def apply_window(arr: np.ndarray, window) -> np.ndarray:
    """Map [level - width/2, level + width/2] to [0, 1] (clipped), float32."""
    level, width = parse_window(window)
    lo = level - width / 2.0
    return np.clip((np.asarray(arr, np.float32) - lo) / width, 0.0, 1.0)


def to_uint8(arr: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Robust min-max to 8 bits for display (percentile clipping)."""
    a = np.asarray(arr, np.float32)
    lo, hi = np.percentile(a[np.isfinite(a)], [lo_pct, hi_pct]) if np.isfinite(a).any() else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


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
    import cv2

    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = to_uint8(a)
    op = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile))
    if a.ndim == 3 and a.shape[-1] == 3:
        lab = cv2.cvtColor(a, cv2.COLOR_RGB2LAB)
        lab[..., 0] = op.apply(lab[..., 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return op.apply(a)
