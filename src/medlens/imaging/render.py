"""Rendering: MIP / MinIP, multi-planar reformat, isosurface mesh rendered to PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from skimage.measure import marching_cubes, mesh_surface_area

from medlens.io.image import Image
from medlens.io.views import mip, orthogonal_slices
from medlens.utils import atomic_path


def mpr(image: Image, center_zyx=None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal planes through a point (default: the centre)."""
    return {k: v for k, (v, _) in orthogonal_slices(image, center_zyx).items()}


def minip(image: Image, axis: int = 0) -> np.ndarray:
    return mip(image, axis=axis, min_ip=True)


def isosurface_png(image: Image | np.ndarray, path: str | Path, level: float, spacing=None, step: int = 2,
                   elev: float = 20, azim: float = -60) -> dict:
    """Marching-cubes isosurface (scikit-image) rendered with matplotlib to PNG; returns mesh stats."""
    arr = image.array if isinstance(image, Image) else np.asarray(image)
    sp = tuple(image.spacing) if isinstance(image, Image) else tuple(spacing or (1.0, 1.0, 1.0))
    verts, faces, _, _ = marching_cubes(arr.astype(np.float32), level=level, spacing=sp, step_size=step)
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(111, projection="3d")
    mesh = Poly3DCollection(verts[faces][:, :, ::-1], alpha=0.9, linewidths=0)
    mesh.set_facecolor((0.85, 0.75, 0.65))
    ax.add_collection3d(mesh)
    ext = np.array(arr.shape) * np.array(sp)
    ax.set_xlim(0, ext[2]); ax.set_ylim(0, ext[1]); ax.set_zlim(0, ext[0])
    ax.view_init(elev=elev, azim=azim)
    ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return {"vertices": int(len(verts)), "faces": int(len(faces)), "area_mm2": float(mesh_surface_area(verts, faces))}
