"""The training input's profile and the out-of-distribution check of ``Predictor``.

A run stores what its training inputs looked like (``RunMeta.input_profile``): their modality, whether
the source images were colour, their size before resizing, and the histogram of the prepared model
inputs, with how far training images themselves fall from it. ``check_input`` compares one input with
that profile and returns plain-language reasons when it falls outside: a CT slice given to a chest
X-ray model is then answered with a warning beside the prediction, not silently. It is a simple check
(a wrong modality tag, a colour mismatch, a size far from the training sizes, an intensity histogram
farther, by earth mover's distance, from the training one than the training images' own 99.5th
percentile), not a guarantee: a CT slice is told apart by its modality tag and size, not by its intensities.
The body part is compared when both the training headers and the input's say it (DICOM BodyPartExamined).
Segmenters record a profile too (``profile_of_cases``: their training cases' volumes, histogram on a sample of
voxels). ``require_in_profile`` is the gate of every export that leaves medlens (SR, SEG, FHIR, serve answers,
PACS push): an input outside the profile is refused unless the caller allows it.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medlens.data.sources import get_source
from medlens.errors import DataError

N_BINS = 32
SIZE_FACTOR = 2.0          # an input more than 2x larger or smaller than every training image is flagged
DISTANCE_MARGIN = 0.05     # added to the training images' 99.5th-percentile histogram distance
# modality tags that raster files get without knowing what they hold (io.raster: OT, or XC for colour)
UNKNOWN_MODALITIES = {None, "", "OT", "XC"}
# tags that are one kind of picture for this check
MODALITY_FAMILIES = {"DX": "X-ray", "CR": "X-ray", "DR": "X-ray", "RG": "X-ray", "MG": "mammography",
                     "CT": "CT", "MR": "MR", "US": "ultrasound", "OP": "fundus photo", "OPT": "OCT",
                     "SM": "microscopy", "PT": "PET", "NM": "nuclear medicine"}


class InputProfile(BaseModel):
    """What the training inputs looked like (``RunMeta.input_profile``)."""

    model_config = ConfigDict(extra="forbid")

    modality: str | None = None           # DICOM modality tag of the training images, when known
    body_part: str | None = None          # DICOM BodyPartExamined of the training images, when one and known
    source_rgb: bool | None = None        # were the source images colour (before the colour mode)?
    size_min: list[int] | None = None     # smallest training image before resizing (spatial axes)
    size_max: list[int] | None = None
    hist_range: list[float]               # [low, high] of the histogram bins (model-input scale)
    hist: list[float]                     # mean normalised histogram of training inputs (+ 2 overflow bins)
    distance_limit: float                 # histogram distance above which an input is flagged
    n: int = Field(ge=0)                  # training images profiled

    # read from run.json like any input (issue 25): a NaN limit would silently switch the check off
    @field_validator("distance_limit")
    @classmethod
    def _limit(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{v}: the histogram distance limit must be finite and > 0")
        return v

    @field_validator("hist_range")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(math.isfinite(x) for x in v) or not v[0] < v[1]:
            raise ValueError(f"{v}: the histogram range must be two finite numbers, low < high")
        return v

    @field_validator("hist")
    @classmethod
    def _hist(cls, v: list[float]) -> list[float]:
        if len(v) != N_BINS + 2 or not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError(f"the histogram must hold {N_BINS + 2} finite non-negative values")
        return v

    @field_validator("size_min", "size_max")
    @classmethod
    def _size(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or any(s < 1 for s in v)):
            raise ValueError(f"{v}: a training image size is two positive numbers of pixels")
        return v

    @model_validator(mode="after")
    def _order(self) -> "InputProfile":
        if self.size_min and self.size_max and any(a > b for a, b in zip(self.size_min, self.size_max)):
            raise ValueError(f"size_min {self.size_min} is larger than size_max {self.size_max}")
        return self


def _family(modality: str | None) -> str | None:
    if modality in UNKNOWN_MODALITIES:
        return None
    return MODALITY_FAMILIES.get(str(modality).upper(), str(modality).upper())


def histogram(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Normalised histogram of one prepared input: ``N_BINS`` bins on [lo, hi] plus below/above bins."""
    v = np.asarray(x, np.float64).ravel()
    inside, _ = np.histogram(np.clip(v, lo, hi), bins=N_BINS, range=(lo, hi))
    inside = inside.astype(np.float64)
    below, above = float((v < lo).sum()), float((v > hi).sum())
    inside[0] -= below  # clipped values were counted in the edge bins
    inside[-1] -= above
    h = np.concatenate([[below], inside, [above]])
    return h / max(h.sum(), 1.0)


def distance(h: np.ndarray, ref: np.ndarray) -> float:
    """Earth mover's distance of two normalised histograms, as a fraction of the histogram range (0 =
    identical; 1 = all mass moved from one end to the other). Unlike a bin-by-bin distance it does not
    grow with the pixel noise of single small images, only with how far their intensities shift."""
    h, ref = np.asarray(h, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(np.cumsum(h) - np.cumsum(ref)).sum() / (len(ref) - 2))


def _body_part(value) -> str | None:
    v = " ".join(str(value or "").upper().replace("_", " ").split())
    return v or None


def build_profile(ds, modality: str | None, source_rgb: bool | None, sizes: list[tuple[int, ...]] | None,
                  max_images: int = 2048, seed: int = 0, body_part: str | None = None) -> InputProfile:
    """The profile of a training dataset (``len``/``batch(idx)``), from up to ``max_images`` images."""
    n = len(ds)
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, max_images), replace=False))
    xs = np.concatenate([ds.batch(idx[i:i + 256])[0].numpy() for i in range(0, len(idx), 256)])
    return _profile(list(xs), modality, source_rgb, sizes, body_part)


def _profile(xs: list[np.ndarray], modality: str | None, source_rgb: bool | None,
             sizes: list[tuple[int, ...]] | None, body_part: str | None) -> InputProfile:
    """The profile of prepared inputs ``xs`` (any shapes) and what their sources looked like."""
    pooled = np.concatenate([np.ravel(x) for x in xs])
    lo, hi = (float(v) for v in np.quantile(pooled, [0.001, 0.999]))
    if hi <= lo:
        hi = lo + 1.0
    hists = np.stack([histogram(x, lo, hi) for x in xs])
    ref = hists.mean(0)
    d = np.array([distance(h, ref) for h in hists])
    limit = float(np.quantile(d, 0.995)) + DISTANCE_MARGIN
    smin = smax = None
    if sizes:
        arr = np.array([s[-2:] for s in sizes])
        smin, smax = arr.min(0).astype(int).tolist(), arr.max(0).astype(int).tolist()
    return InputProfile(modality=modality, body_part=_body_part(body_part), source_rgb=source_rgb, size_min=smin,
                        size_max=smax, hist_range=[lo, hi], hist=ref.round(6).tolist(),
                        distance_limit=round(limit, 6), n=int(len(xs)))


def check_input(profile: InputProfile, prepared: np.ndarray, modality: str | None = None,
                is_rgb: bool | None = None, shape: tuple[int, ...] | None = None,
                body_part: str | None = None) -> list[str]:
    """Reasons an input falls outside the training profile (empty when it does not)."""
    out = []
    want, got = _family(profile.modality), _family(modality)
    if want and got and want != got:
        out.append(f"modality {modality} ({got}) but the model was trained on {profile.modality} ({want}) images")
    part = _body_part(body_part)
    if profile.body_part and part and part != profile.body_part:
        out.append(f"body part {part} but the model was trained on {profile.body_part} images")
    if profile.source_rgb is not None and is_rgb is not None and bool(is_rgb) != profile.source_rgb:
        out.append(f"a {'colour' if is_rgb else 'gray-scale'} image, but the model was trained on "
                   f"{'colour' if profile.source_rgb else 'gray-scale'} images")
    if shape is not None and profile.size_min and profile.size_max:
        s = np.asarray(shape[-2:], float)
        if (s > SIZE_FACTOR * np.asarray(profile.size_max)).any() or (s * SIZE_FACTOR < np.asarray(profile.size_min)).any():
            span = ("x".join(map(str, profile.size_min)) if profile.size_min == profile.size_max else
                    f"{'x'.join(map(str, profile.size_min))} to {'x'.join(map(str, profile.size_max))}")
            out.append(f"size {'x'.join(str(int(v)) for v in shape[-2:])} px, training images were {span} px")
    d = distance(histogram(prepared, *profile.hist_range), np.asarray(profile.hist))
    if d > profile.distance_limit:
        out.append(f"intensity histogram distance {d:.2f} from the training inputs (training images reach "
                   f"{profile.distance_limit - DISTANCE_MARGIN:.2f})")
    return out


def profile_of(data, cfg_data) -> InputProfile | None:
    """The input profile of a classifier's training split (``SplitData``), from its source (MedMNIST
    catalogue, patch store: its ``profile_hints``) or from the image files as loaded (``prepared_data`` records them)."""
    tr = data.train
    if len(tr) == 0:
        return None
    raw = getattr(tr, "meta", {}).get("raw_inputs")
    hints = get_source(cfg_data.source).profile_hints(tr, cfg_data)
    declared = getattr(cfg_data, "modality", None)  # data.modality: for files that do not say it
    if hints is not None:  # what the source itself knows (catalogue modality, patch store in HU)
        return build_profile(tr, hints[0] or declared, hints[1], [tr.image_shape])
    if raw:
        mods = {r[2] for r in raw if r[2] not in UNKNOWN_MODALITIES}
        rgbs = {r[1] for r in raw}
        parts = {_body_part(r[3]) if len(r) > 3 else None for r in raw}
        return build_profile(tr, mods.pop() if len(mods) == 1 else declared,
                             rgbs.pop() if len(rgbs) == 1 else None, [r[0] for r in raw if len(r[0]) >= 2],
                             body_part=parts.pop() if len(parts) == 1 else None)
    return build_profile(tr, declared, None, None)


def profile_of_cases(cases, modality: str | None = None, max_voxels: int = 200_000,
                     seed: int = 0) -> InputProfile | None:
    """The input profile of a segmenter's training cases (``data.segmentation.SegCase``: prepared image, and the
    source's geometry with its modality and header): the histogram of each case on up to ``max_voxels`` voxels,
    modality (the headers', else ``modality``: ``data.modality``), body part and colour when every case says
    the same, and the in-plane sizes."""
    if not cases:
        return None
    rng = np.random.default_rng(seed)
    xs = []
    for k in cases:
        v = np.asarray(k.image, np.float32).ravel()
        xs.append(v if v.size <= max_voxels else v[rng.choice(v.size, max_voxels, replace=False)])
    geo = [k.geometry for k in cases]
    mods = {g.modality for g in geo if g.modality not in UNKNOWN_MODALITIES}
    parts = {_body_part(g.meta.get("BodyPartExamined")) for g in geo}
    rgbs = {k.display is not None and k.display.ndim == k.mask.ndim + 1 for k in cases}
    sizes = [tuple(int(v) for v in g.shape[:g.spatial_dims]) for g in geo]
    return _profile(xs, mods.pop() if len(mods) == 1 else modality, rgbs.pop() if len(rgbs) == 1 else None,
                    [s for s in sizes if len(s) >= 2], parts.pop() if len(parts) == 1 else None)


class OutOfProfile(DataError):
    """An input outside the run's training profile, refused where results would leave medlens."""

    def __init__(self, reasons: list[str], path) -> None:
        self.reasons = list(reasons)
        super().__init__(f"outside the training data ({'; '.join(self.reasons)}); refused: nothing written "
                         "(--allow-out-of-profile exports it with the reasons attached)", path)


def require_in_profile(reasons: list[str], path, allow: bool) -> None:
    """The export gate: raise ``OutOfProfile`` naming ``path`` and the ``reasons`` unless ``allow``."""
    if reasons and not allow:
        raise OutOfProfile(reasons, path)
