"""Hand-made features within a mask: first-order statistics, GLCM texture, 3D shape."""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.spatial import ConvexHull
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import marching_cubes, mesh_surface_area

from medlens.errors import DataError
from medlens.imaging._common import as_array, check_mask
from medlens.io.image import Image


def first_order(x, mask) -> dict[str, float]:
    """Intensity statistics of the voxels inside ``mask``."""
    a = as_array(x).astype(np.float64)
    v = a[check_mask(a, mask)]
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    hist, _ = np.histogram(v, bins=64)
    p = hist[hist > 0] / hist.sum()
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "median": float(p50), "p10": float(p10), "p90": float(p90), "iqr": float(p75 - p25),
            "skewness": float(stats.skew(v)) if v.std() > 0 else 0.0,
            "kurtosis": float(stats.kurtosis(v)) if v.std() > 0 else 0.0,
            "energy": float((v ** 2).sum()), "entropy": float(-(p * np.log2(p)).sum()), "voxels": int(v.size)}


def glcm(x, mask=None, levels: int = 32, distances=(1,)) -> dict[str, float]:
    """Grey-level co-occurrence texture (scikit-image), averaged over 4 in-plane angles and, for a
    volume, over the slices that hold mask voxels. Averaging over 0/45/90/135 degrees makes the
    features invariant to 90-degree rotations."""
    a = as_array(x).astype(np.float64)
    m = check_mask(a, mask) if mask is not None else np.ones(a.shape, bool)
    lo, hi = np.percentile(a[m], [0.5, 99.5])
    q = np.clip(((a - lo) / max(hi - lo, 1e-9) * (levels - 1)).round(), 0, levels - 1).astype(np.uint8)
    q = np.where(m, q, 0)
    slices = [q] if q.ndim == 2 else [q[k] for k in np.flatnonzero(m.any((1, 2)))]
    props = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
    acc = {p: [] for p in props}
    for s in slices:
        g = graycomatrix(s, distances=list(distances), angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                         levels=levels, symmetric=True, normed=True)
        g[0, 0] = 0  # ignore the background pairs outside the mask
        tot = g.sum(axis=(0, 1), keepdims=True)
        g = np.divide(g, tot, out=np.zeros_like(g), where=tot > 0)
        for p in props:
            acc[p].append(float(np.nanmean(graycoprops(g, p))))
    return {f"glcm_{p}": float(np.mean(v)) for p, v in acc.items()}


def shape(mask: Image | np.ndarray, spacing=None) -> dict[str, float]:
    """3D shape of a mask in mm: volume, surface area (marching cubes), sphericity, maximum 3D diameter."""
    m = np.asarray(mask.array if isinstance(mask, Image) else mask).astype(bool)
    sp = tuple(mask.spacing) if isinstance(mask, Image) else tuple(spacing or (1.0,) * m.ndim)
    if not m.any():
        raise DataError("mask is empty (no foreground voxel)")
    volume = float(m.sum() * np.prod(sp))
    padded = np.pad(m, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=sp)
    area = float(mesh_surface_area(verts, faces))
    sphericity = float((np.pi ** (1 / 3)) * (6 * volume) ** (2 / 3) / area) if area > 0 else float("nan")
    pts = np.argwhere(m) * np.array(sp)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except Exception:  # flat or tiny masks
        hull = pts
    if len(hull) > 3000:
        hull = hull[np.random.default_rng(0).choice(len(hull), 3000, replace=False)]
    dmax = float(np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1)).max()) if len(hull) > 1 else 0.0
    return {"volume_mm3": volume, "surface_area_mm2": area, "sphericity": sphericity, "max_diameter_mm": dmax,
            "voxels": int(m.sum())}
