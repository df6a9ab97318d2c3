"""Classical segmentation helpers used across medlens."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medlens.io.image import Image


def largest_components(mask: np.ndarray, n: int = 1) -> np.ndarray:
    """Keep the ``n`` largest connected components of a boolean mask."""
    lab, k = ndimage.label(mask)
    if k <= n:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, lab, range(1, k + 1))
    keep = np.argsort(sizes)[::-1][:n] + 1
    return np.isin(lab, keep)


def lung_mask(ct: Image, threshold_hu: float = -320.0) -> np.ndarray:
    """Lung fields of a chest CT in HU: air-like voxels inside the body.

    Threshold at ``threshold_hu``, remove air connected to the volume's border (outside the body),
    keep the two largest components (the lungs, or one if they touch), then close small holes
    (vessels and nodules) slice by slice.
    """
    air = ct.array < threshold_hu
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    inside = air & ~np.isin(lab, border[border > 0])
    lungs = largest_components(inside, 2)
    sizes = [int((largest_components(lungs, 1)).sum()), int(lungs.sum())]
    if sizes[1] > 0 and sizes[0] / sizes[1] > 0.9:  # one dominant component: lungs touch
        lungs = largest_components(lungs, 1)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in lungs])
    return ndimage.binary_closing(filled, structure=np.ones((1, 5, 5)), iterations=2) | filled
