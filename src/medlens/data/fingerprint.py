"""The dataset fingerprint the planner (``medlens plan``, ``workflow.plan``) decides from.

Everything here is measured on the data: dimensionality, image size and channels, intensity statistics and
modality hints, class counts and imbalance, task type, n per split, whether patient ids are present, and for a
MedMNIST-format file which higher resolutions lie next to it on disk. No dataset is known by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from medlens.data.base import SplitData
from medlens.errors import DataError
from medlens.tasks import get_task

SPLITS = ("train", "val", "test")
_SIZE_SUFFIX = re.compile(r"^(?P<base>.+?)(?:_(?P<size>\d+))?$")


class Intensity(BaseModel):
    """Intensity statistics of the model inputs (a seeded sample of training images, all channels pooled)."""

    model_config = ConfigDict(extra="forbid")
    mean: float
    std: float
    min: float
    max: float
    p01: float
    p99: float
    distinct_values: int          # in the sample, capped at 1000 (few values: masks or label maps)
    zero_fraction: float          # share of voxels exactly at the sample minimum (background)
    channel_means: list[float]
    corner_to_centre: float       # mean of the four corner patches / mean of the centre patch (2D)


class Fingerprint(BaseModel):
    """What the planner knows about a dataset."""

    model_config = ConfigDict(extra="forbid")
    source: str                   # medmnist | folder | csv | hdf5
    location: str                 # the file or folder (or catalogue entry) it was read from
    task: str                     # binary | multiclass | ordinal | multilabel
    spatial_dims: int
    image_shape: list[int]
    channels: int
    n: dict[str, int]             # per split
    n_classes: int
    class_names: list[str]
    class_counts: dict[str, list[int]]
    imbalance_ratio: float        # largest / smallest training class (multi-label: negatives / positives, worst)
    patient_ids: bool             # patient ids present (patient-level split possible)
    intensity: Intensity
    modality_hints: list[str]
    field_of_view: str            # circular (dark corners) | full
    resolutions_on_disk: list[int]  # MedMNIST-format files of the same data at other sizes, beside the file
    resolution_files: dict[int, str]


def sibling_resolutions(path: Path | None) -> dict[int, str]:
    """Sizes -> files of the same MedMNIST-format data beside ``path``: ``<base>.npz`` is 28 px (MedMNIST's
    convention), ``<base>_<size>.npz`` is ``size``."""
    if path is None or path.suffix != ".npz" or not path.parent.is_dir():
        return {}
    own = _SIZE_SUFFIX.match(path.stem)
    if own is None:  # an empty stem
        return {}
    base = own.group("base")
    out = {}
    for f in sorted(path.parent.glob(f"{base}*.npz")):
        m = _SIZE_SUFFIX.match(f.stem)
        if m is None or m.group("base") != base:
            continue
        out[int(m.group("size") or 28)] = str(f)
    return out


def intensity_stats(x: np.ndarray, spatial_dims: int) -> Intensity:
    """Statistics of a batch ``(n, c, *spatial)`` of model inputs."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1)
    lo = float(flat.min())
    ratio = 1.0
    if spatial_dims == 2:
        h, w = x.shape[-2:]
        k = max(1, min(h, w) // 7)
        corners = np.concatenate([x[..., :k, :k].ravel(), x[..., :k, -k:].ravel(), x[..., -k:, :k].ravel(),
                                  x[..., -k:, -k:].ravel()])
        cy, cx = h // 2, w // 2
        centre = x[..., cy - k:cy + k, cx - k:cx + k]
        c_mean = float(centre.mean()) - lo
        ratio = float((corners.mean() - lo) / c_mean) if c_mean > 1e-8 else 1.0
    axes = (0,) + tuple(range(2, x.ndim))
    return Intensity(mean=float(flat.mean()), std=float(flat.std()), min=lo, max=float(flat.max()),
                     p01=float(np.percentile(flat, 1)), p99=float(np.percentile(flat, 99)),
                     distinct_values=int(min(1000, len(np.unique(flat[:200_000])))),
                     zero_fraction=float(np.mean(flat == lo)), channel_means=x.mean(axis=axes).tolist(),
                     corner_to_centre=round(ratio, 4))


def _hints(channels: int, dims: int, it: Intensity) -> tuple[list[str], str]:
    hints = []
    fov = "circular" if dims == 2 and it.corner_to_centre < 0.25 else "full"
    if dims == 3:
        hints.append("volume (3D): flips in every axis keep the content plausible")
    if it.distinct_values <= 16:
        hints.append(f"{it.distinct_values} distinct intensities: mask- or label-map-like")
    if channels == 3:
        cm = it.channel_means
        hints.append("colour photograph" + (" (red-dominant, fundus/skin-like)" if cm[0] > max(cm[1:]) * 1.2 else ""))
    elif dims == 2:
        hints.append("grayscale 2D (radiograph-, ultrasound- or slice-like)")
    if fov == "circular":
        hints.append("dark corners around a bright centre: a circular field of view (orientation-free content)")
    return hints, fov


def _imbalance(counts: np.ndarray, task: str, n: int) -> float:
    return get_task(task).imbalance(counts, n)


def fingerprint(data: SplitData, source: str, location: str | Path, path: Path | None = None,
                seed: int = 0, sample: int = 512) -> Fingerprint:
    """The fingerprint of loaded splits. ``path``: the MedMNIST-format file, to find other resolutions."""
    tr = data.train
    for s in SPLITS:
        if len(data.get(s)) == 0:
            raise DataError(f"the {s} split is empty; the planner needs train, val and test", location)
    counts = {s: data.get(s).class_counts().astype(int).tolist() for s in SPLITS}
    present = int(np.sum(np.asarray(counts["train"]) > 0))
    if get_task(data.task).exclusive and present < 2:
        raise DataError(f"the training split has {present} class; a classifier needs at least two", location)
    idx = np.sort(np.random.default_rng(seed).choice(len(tr), min(len(tr), sample), replace=False))
    x = tr.batch(idx)[0].float().numpy()
    it = intensity_stats(x, tr.spatial_dims)
    hints, fov = _hints(tr.in_channels, tr.spatial_dims, it)
    files = sibling_resolutions(path)
    # a loader without patient ids numbers the images (one id each); ids shared by several images are patients
    has_pids = len(set(map(str, tr.patient_ids))) < len(tr)
    return Fingerprint(
        source=source, location=str(location), task=str(data.task), spatial_dims=tr.spatial_dims,
        image_shape=list(tr.image_shape), channels=tr.in_channels, n={s: len(data.get(s)) for s in SPLITS},
        n_classes=len(data.class_names), class_names=list(data.class_names), class_counts=counts,
        imbalance_ratio=round(_imbalance(np.asarray(counts["train"]), data.task, len(tr)), 3),
        patient_ids=bool(has_pids), intensity=it, modality_hints=hints, field_of_view=fov,
        resolutions_on_disk=sorted(files), resolution_files=files)
