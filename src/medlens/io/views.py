"""Quick looks: axial, coronal and sagittal slices and a MIP as windowed PNGs, at the true aspect ratio."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage

from medlens.errors import DataError
from medlens.io.image import Image
from medlens.io.windows import apply_window
from medlens.utils import atomic_path


def orthogonal_slices(image: Image, center_zyx=None) -> dict[str, tuple[np.ndarray, float]]:
    """Slices through ``center_zyx`` (default: the middle): name -> (2D array, pixel aspect = dy/dx)."""
    if image.spatial_dims != 3 or image.is_rgb:
        raise DataError("orthogonal views need a scalar 3D volume")
    a = image.array
    if center_zyx is None:
        z, y, x = (int(n) // 2 for n in a.shape)
    else:
        c = np.asarray(center_zyx, float)
        if c.shape != (3,) or not np.all(np.isfinite(c)) or np.any(c < -0.5) or np.any(c > np.array(a.shape) - 0.5):
            raise DataError(f"point at voxel (z, y, x) ({', '.join(f'{v:.1f}' for v in np.ravel(c))}) lies outside "
                            f"the volume of {a.shape[0]} x {a.shape[1]} x {a.shape[2]} voxels",
                            image.meta.get("source"))
        z, y, x = (int(np.clip(round(v), 0, n - 1)) for v, n in zip(c, a.shape))
    sz, sy, sx = image.spacing
    return {"axial": (a[z], sy / sx), "coronal": (a[:, y, :][::-1], sz / sx), "sagittal": (a[:, :, x][::-1], sz / sy)}


def mip(image: Image, axis: int = 1, min_ip: bool = False) -> np.ndarray:
    """Maximum (or minimum) intensity projection along an array axis (0 = z, 1 = y: coronal MIP)."""
    return image.array.min(axis=axis) if min_ip else image.array.max(axis=axis)


def _resize_aspect(arr: np.ndarray, aspect: float) -> np.ndarray:
    if abs(aspect - 1.0) < 1e-3:
        return arr
    h, w = arr.shape
    return cv2.resize(arr, (w, max(1, int(round(h * aspect)))), interpolation=cv2.INTER_LINEAR)


def write_views(image: Image, out_dir: str | Path, window="lung", center_zyx=None, prefix: str = "") -> list[Path]:
    """Write axial/coronal/sagittal slices and a coronal MIP as PNG (windowed, aspect-corrected)."""
    views = orthogonal_slices(image, center_zyx)  # refuses a centre outside the volume before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = image.spacing
    views["mip_coronal"] = (mip(image, axis=1)[::-1], sz / sx)
    paths = []
    for name, (arr, aspect) in views.items():
        u8 = (apply_window(arr, window) * 255).round().astype(np.uint8) if window else arr.astype(np.uint8)
        u8 = _resize_aspect(u8, aspect)
        p = out_dir / f"{prefix}{name}.png"
        with atomic_path(p) as tmp:
            PILImage.fromarray(u8).save(tmp, format="PNG")
        paths.append(p)
    return paths
