"""The one image type of medlens.

Axis order, stated once: ``array`` is ``(z, y, x)`` for volumes and ``(y, x)`` for 2D images,
exactly as SimpleITK's ``GetArrayFromImage`` returns it, with a trailing channel axis for
multi-component (RGB) images. ``spacing`` follows the array axes (so ``(z, y, x)`` in mm).
``origin`` is the world position (LPS, mm, ``(x, y, z)``) of voxel 0, and ``direction`` is the
3x3 (or 2x2) matrix whose column ``j`` is the world direction of index axis ``j`` in
``(x, y, z)`` index order (SimpleITK's convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medlens.errors import DataError, ShapeError


@dataclass(init=False)
class Image:
    """An image array with its grid. ``spacing``, ``origin`` and ``direction`` may be left out (1 mm, the world
    origin, the identity); once constructed they are always set."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    modality: str
    meta: dict[str, Any]
    is_rgb: bool

    def __init__(self, array: np.ndarray, spacing: Sequence[float] | None = None,
                 origin: Sequence[float] | None = None, direction: np.ndarray | Sequence[Any] | None = None,
                 modality: str = "OT", meta: dict[str, Any] | None = None, is_rgb: bool = False) -> None:
        self.array = array
        self.modality = modality
        self.meta = {} if meta is None else meta
        self.is_rgb = is_rgb
        nd = self.spatial_dims
        if nd not in (2, 3):
            raise ShapeError(f"an Image is 2D or 3D, got array shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in (spacing or (1.0,) * nd))
        self.origin = tuple(float(s) for s in (origin or (0.0,) * nd))
        self.direction = np.eye(nd) if direction is None else np.asarray(direction, float).reshape(nd, nd)
        if len(self.spacing) != nd or len(self.origin) != nd:
            raise ShapeError(f"spacing {self.spacing} / origin {self.origin} do not fit a {nd}D image")
        if not all(math.isfinite(s) and s > 0 for s in self.spacing):  # every reader checks; this is the backstop
            raise DataError(f"voxel spacing ({', '.join(f'{s:g}' for s in self.spacing)}) mm must be finite and > 0",
                            self.meta.get("source"))

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - (1 if self.is_rgb else 0)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order."""
        return tuple(self.array.shape[: self.spatial_dims])

    @property
    def spacing_xyz(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    def voxel_to_world(self, index_zyx) -> np.ndarray:
        """World (x, y, z) mm of a (fractional) voxel index given in array order (z, y, x).

        Accepts one index or an (N, ndim) array of them.
        """
        idx = np.asarray(index_zyx, float)
        ijk = idx[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing_xyz)) @ self.direction.T

    def world_to_voxel(self, point_xyz) -> np.ndarray:
        """Fractional voxel index in array order (z, y, x) of a world point (x, y, z) mm."""
        p = np.asarray(point_xyz, float) - np.asarray(self.origin)
        ijk = (p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing_xyz)
        return ijk[..., ::-1]

    def with_array(self, array: np.ndarray, **changes) -> "Image":
        """A copy with a new array of the same grid (or with grid fields changed)."""
        kw: dict[str, Any] = dict(spacing=self.spacing, origin=self.origin, direction=self.direction,
                                  modality=self.modality, meta=dict(self.meta), is_rgb=self.is_rgb)
        kw.update(changes)
        return Image(array, **kw)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self.spacing)
        return (f"Image(shape={self.array.shape}, dtype={self.array.dtype}, spacing=({sp}), "
                f"modality={self.modality})")
