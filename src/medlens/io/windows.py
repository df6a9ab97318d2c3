"""CT windows and 8-bit display scaling: what writers, views and model-input preparation share.

Presets are (level, width) in HU. ``apply_window`` maps a window to [0, 1]; ``to_uint8`` is a robust
min-max to 8 bits for display.
"""

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
    if not (np.isfinite(level) and np.isfinite(width)):
        raise ConfigError(f"window level and width must be finite numbers, got {level}, {width}")
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
