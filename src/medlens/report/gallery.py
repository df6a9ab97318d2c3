"""The gallery of a nodule detection: one PNG per strongest candidate (an axial lung-window crop with the
candidate's estimated extent) and an index page rendered from the autoescaping ``nodules.html`` template."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from jinja2 import Environment, PackageLoader

from medlens.evaluation.plots import save_figure
from medlens.io.windows import apply_window
from medlens.utils import atomic_path


def candidate_png(hu_patch: np.ndarray, radius_px: float, path: str | Path, label: str = "") -> Path:
    """An axial HU patch in the lung window with a circle of ``radius_px`` at its centre."""
    fig, ax = plt.subplots(figsize=(2.4, 2.4))
    ax.imshow(apply_window(hu_patch.astype(np.float32), "lung"), cmap="gray", vmin=0, vmax=1)
    c = (np.array(hu_patch.shape[::-1]) - 1) / 2
    ax.add_patch(plt.Circle(tuple(c), radius_px, fill=False, color="orange", lw=1.2))
    ax.set_axis_off()
    if label:
        ax.set_title(label, fontsize=8)
    return save_figure(fig, Path(path))


def write_gallery(path: str | Path, *, title: str, notes: list[str], scans: list[dict], figures: list[dict],
                  classifier: str, threshold: str, froc: dict | None = None) -> Path:
    """Render the detection page; ``froc['png']`` is a path read into the page, figures link their PNGs."""
    env = Environment(loader=PackageLoader("medlens.report", "templates"), autoescape=True)
    if froc is not None and froc.get("png"):
        froc = dict(froc, png=base64.b64encode(Path(froc["png"]).read_bytes()).decode())
    html = env.get_template("nodules.html").render(title=title, notes=notes, scans=scans, figures=figures,
                                                    classifier=classifier, threshold=threshold, froc=froc)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    return path
