"""Quick looks: axial, coronal and sagittal slices and a MIP as windowed PNGs, at the true aspect ratio.

The coronal MIP is a slab MIP: the maximum over ``MIP_SLAB_MM`` of tissue centred on the coronal slice, as
radiology reads MIPs of the chest (thin-slab MIP for vessels and nodules). Projected through the whole
volume, every ray of a chest CT meets the table, ribs or spine, so in the lung window the image was white
(73% of pixels saturated on LIDC-IDRI-0001); ``mip_slab_mm=None`` projects the whole volume.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage

from medlens.errors import DataError
from medlens.io.image import Image
from medlens.io.windows import apply_window
from medlens.utils import atomic_path


#: thickness of the coronal MIP's slab in mm (thin-slab MIP of the chest: vessels and nodules, not the skeleton)
MIP_SLAB_MM = 10.0


def _center(image: Image, center_zyx) -> tuple[int, int, int]:
    """The voxel ``center_zyx`` (default: the middle), refused when it lies outside the volume."""
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
    return z, y, x


def orthogonal_slices(image: Image, center_zyx=None) -> dict[str, tuple[np.ndarray, float]]:
    """Slices through ``center_zyx`` (default: the middle): name -> (2D array, pixel aspect = dy/dx)."""
    z, y, x = _center(image, center_zyx)
    a = image.array
    sz, sy, sx = image.spacing
    return {"axial": (a[z], sy / sx), "coronal": (a[:, y, :][::-1], sz / sx), "sagittal": (a[:, :, x][::-1], sz / sy)}


def mip(image: Image, axis: int = 1, min_ip: bool = False, slab: tuple[int, int] | None = None) -> np.ndarray:
    """Maximum (or minimum) intensity projection along an array axis (0 = z, 1 = y: coronal MIP); ``slab``:
    only the indices ``[start, stop)`` along that axis (a slab MIP)."""
    a = image.array
    if slab is not None:
        a = np.take(a, np.arange(max(0, slab[0]), min(a.shape[axis], slab[1])), axis=axis)
    return a.min(axis=axis) if min_ip else a.max(axis=axis)


def slab_indices(n: int, center: int, thickness_mm: float, spacing_mm: float) -> tuple[int, int]:
    """``[start, stop)`` of the slices within ``thickness_mm`` centred on slice ``center`` (at least that one)."""
    half = int(round(thickness_mm / 2.0 / spacing_mm)) if spacing_mm > 0 else 0
    return max(0, center - half), min(n, center + half + 1)


def _resize_aspect(arr: np.ndarray, aspect: float) -> np.ndarray:
    if abs(aspect - 1.0) < 1e-3:
        return arr
    h, w = arr.shape
    return cv2.resize(arr, (w, max(1, int(round(h * aspect)))), interpolation=cv2.INTER_LINEAR)


def write_views(image: Image, out_dir: str | Path, window="lung", center_zyx=None, prefix: str = "",
                mip_slab_mm: float | None = MIP_SLAB_MM) -> list[Path]:
    """Write axial/coronal/sagittal slices and a coronal MIP as PNG (windowed, aspect-corrected); the MIP is of a
    ``mip_slab_mm`` slab centred on the coronal slice (None: the whole volume)."""
    views = orthogonal_slices(image, center_zyx)  # refuses a centre outside the volume before anything is written
    if mip_slab_mm is not None and not (np.isfinite(mip_slab_mm) and mip_slab_mm > 0):
        raise DataError(f"the MIP slab must be a positive thickness in mm, not {mip_slab_mm}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = image.spacing
    y = _center(image, center_zyx)[1]
    slab = None if mip_slab_mm is None else slab_indices(image.array.shape[1], y, mip_slab_mm, sy)
    views["mip_coronal"] = (mip(image, axis=1, slab=slab)[::-1], sz / sx)
    paths = []
    for name, (arr, aspect) in views.items():
        u8 = (apply_window(arr, window) * 255).round().astype(np.uint8) if window else arr.astype(np.uint8)
        u8 = _resize_aspect(u8, aspect)
        p = out_dir / f"{prefix}{name}.png"
        with atomic_path(p) as tmp:
            PILImage.fromarray(u8).save(tmp, format="PNG")
        paths.append(p)
    return paths
