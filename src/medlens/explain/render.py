"""Explanation figures: heat-map overlays with a colour bar (2D), orthogonal planes + MIP (3D)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medlens.utils import atomic_path  # noqa: E402


def _base(img: np.ndarray) -> np.ndarray:
    """(C, *spatial) in [0, 1] -> displayable (*spatial) gray or (*spatial, 3) RGB."""
    return np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0]


def _norm(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay_png(img: np.ndarray, heat: np.ndarray, path: str | Path, title: str, alpha: float = 0.45) -> Path:
    """Write the heat map over the image with a colour bar; 3D: planes through the map's maximum + MIP."""
    heat = np.asarray(heat, np.float32)
    base = _base(img)
    if heat.ndim == 2:
        fig, ax = plt.subplots(1, 2, figsize=(7.2, 3.6), gridspec_kw={"width_ratios": [1, 1.08]})
        ax[0].imshow(base, cmap="gray" if base.ndim == 2 else None, vmin=0, vmax=1)
        ax[0].set_title("input", fontsize=9)
        ax[1].imshow(base, cmap="gray" if base.ndim == 2 else None, vmin=0, vmax=1)
        im = ax[1].imshow(_norm(heat), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax[1].set_title("attribution", fontsize=9)
        fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.04, label="relative attribution")
    else:
        z, y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        vol = base if base.ndim == 3 else base[..., 0]
        planes = [("axial z=%d" % z, vol[z], heat[z]), ("coronal y=%d" % y, vol[:, y][::-1], heat[:, y][::-1]),
                  ("sagittal x=%d" % x, vol[:, :, x][::-1], heat[:, :, x][::-1]),
                  ("MIP (axial)", vol.max(0), heat.max(0))]
        fig, ax = plt.subplots(1, 4, figsize=(13, 3.6))
        lo, hi = float(heat.min()), float(heat.max())
        for a, (name, v, h) in zip(ax, planes):
            a.imshow(v, cmap="gray", vmin=0, vmax=1)
            im = a.imshow((h - lo) / (hi - lo) if hi > lo else np.zeros_like(h), cmap="jet", alpha=alpha, vmin=0,
                          vmax=1)
            a.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax[-1], fraction=0.046, pad=0.04, label="relative attribution")
    for a in np.ravel(ax):
        a.axis("off")
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def panels_png(img: np.ndarray, panels: list[tuple[str, np.ndarray | None, str]], path: str | Path, title: str,
               alpha: float = 0.45) -> Path:
    """One row of panels: ``(title, array, kind)`` with kind ``image`` (shown in gray, [0, 1]) or ``heat``
    (over ``img``, scaled to its own range; ``None``: the panel says 'not available'). 3D: the axial slice
    through the first heat map's maximum."""
    base = _base(img)
    heats = [a for _, a, k in panels if k == "heat" and a is not None]
    z = None
    if base.ndim == 3 and img.shape[0] != 3:  # a volume
        z = int(np.unravel_index(int(np.argmax(heats[0])), heats[0].shape)[0]) if heats else base.shape[0] // 2
        base = base[z]
    fig, ax = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for a, (name, arr, kind) in zip(np.ravel(ax), panels):
        a.axis("off")
        a.set_title(name, fontsize=8)
        if arr is None:
            a.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=8, transform=a.transAxes)
            continue
        arr = np.asarray(arr, np.float32)
        if z is not None:
            arr = arr[0][z] if kind == "image" and arr.ndim == 4 else arr[z]
        elif kind == "image" and arr.ndim == 3:
            arr = _base(arr)
        if kind == "image":
            a.imshow(np.clip(arr, 0, 1), cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1)
        else:
            a.imshow(base, cmap="gray" if base.ndim == 2 else None, vmin=0, vmax=1)
            a.imshow(_norm(arr), cmap="jet", alpha=alpha, vmin=0, vmax=1)
    fig.suptitle(title + (f" (axial slice z={z})" if z is not None else ""), fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)
