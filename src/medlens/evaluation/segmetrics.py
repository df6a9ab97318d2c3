"""Segmentation metrics per case, and their means with patient-level bootstrap CIs.

Overlap: Dice, IoU (Jaccard), sensitivity (recall), precision. Boundary: HD95 (95th-percentile
Hausdorff distance) and MSD (mean symmetric surface distance), in mm through the voxel spacing
(pixels for 2D files that record none). clDice (centre-line Dice) for tubular structures.

Definitions follow MONAI (so the numbers agree with ``DiceMetric`` and ``HausdorffDistanceMetric``):
a surface is the mask minus its erosion (face connectivity); HD95 is the larger of the two directed
95th percentiles; MSD is the mean over both directions' distances pooled.

Empty masks (where MONAI returns inf or nan with a warning, depending on options), stated once:

===================  =======  =====  ===========  =========  ======  ======  ======
reference / pred     Dice     IoU    sensitivity  precision  HD95    MSD     clDice
===================  =======  =====  ===========  =========  ======  ======  ======
both empty           1        1      1            1          0       0       1
reference empty      0        0      nan          0          nan     nan     0
prediction empty     0        0      0            nan        nan     nan     0
===================  =======  =====  ===========  =========  ======  ======  ======

"Nothing to find and nothing found" is a perfect result; a distance to a surface that does not exist
is undefined (nan), never inf, so means stay finite: summaries average the defined values and report
how many cases were undefined (``n_defined``). This equals MONAI's ``DiceMetric(ignore_empty=False)``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from medlens.errors import ShapeError
from medlens.evaluation.metrics import bootstrap_ci

METRICS = ("dice", "iou", "sensitivity", "precision", "hd95", "msd")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return float(2 * (a & b).sum() / s) if s else 1.0


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each predicted surface voxel to the reference surface, and back."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    union = pred | ref
    # crop to the union's bounding box plus a margin of one voxel, as MONAI does
    box = ndimage.find_objects(union.astype(np.uint8))[0]
    assert box is not None  # callers measure only non-empty masks
    sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    p, r = np.pad(pred[sl], 1), np.pad(ref[sl], 1)
    ep, er = _edges(p), _edges(r)
    sampling = None if spacing is None else [float(s) for s in spacing]
    # scipy types the result for every return_* flag; with the defaults it is the distance array
    d_to_ref = cast(np.ndarray, ndimage.distance_transform_edt(~er, sampling=sampling))[ep]
    d_to_pred = cast(np.ndarray, ndimage.distance_transform_edt(~ep, sampling=sampling))[er]
    return d_to_ref, d_to_pred


def cldice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Centre-line Dice (Shit et al., CVPR 2021): harmonic mean of topology precision and sensitivity."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    sp, sr = skeletonize(pred), skeletonize(ref)
    tprec = (sp & ref).sum() / max(sp.sum(), 1)
    tsens = (sr & pred).sum() / max(sr.sum(), 1)
    return float(2 * tprec * tsens / (tprec + tsens)) if tprec + tsens else 0.0


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None, with_cldice: bool = False) -> dict[str, float]:
    """All metrics of one binary prediction against one binary reference (see the module table)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ShapeError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    tp = float((pred & ref).sum())
    npred, nref = float(pred.sum()), float(ref.sum())
    nan = float("nan")
    out: dict[str, float] = {}
    if npred == 0 and nref == 0:
        out = dict(dice=1.0, iou=1.0, sensitivity=1.0, precision=1.0, hd95=0.0, msd=0.0)
    else:
        out["dice"] = dice(pred, ref)
        out["iou"] = tp / (npred + nref - tp)
        out["sensitivity"] = tp / nref if nref else nan
        out["precision"] = tp / npred if npred else nan
        if npred and nref:
            a, b = surface_distances(pred, ref, spacing)
            out["hd95"] = float(max(np.percentile(a, 95), np.percentile(b, 95)))
            out["msd"] = float(np.concatenate([a, b]).mean())
        else:
            out["hd95"] = out["msd"] = nan
    out["volume_pred"] = npred * float(np.prod(spacing)) if spacing is not None else npred
    out["volume_ref"] = nref * float(np.prod(spacing)) if spacing is not None else nref
    if with_cldice:
        out["cldice"] = cldice(pred, ref)
    return out


def summarize(rows: list[dict], groups: list[str] | None = None, n_boot: int = 1000, ci: float = 0.95,
              seed: int = 0, keys: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Mean of each metric over cases with a percentile-bootstrap CI that resamples *patients*
    (``groups``; cases of one patient move together), so two eyes of one child are not counted as
    independent evidence."""
    keys = keys or tuple(k for k in (*METRICS, "cldice") if rows and k in rows[0])
    vals = {k: np.array([r[k] for r in rows], float) for k in keys}
    groups = groups or [str(i) for i in range(len(rows))]
    uniq = sorted(set(groups))
    members = [np.flatnonzero(np.asarray(groups) == g) for g in uniq]

    def mean_over(idx_pat: np.ndarray) -> dict[str, float]:
        idx = np.concatenate([members[i] for i in idx_pat])
        return {k: float(np.nanmean(v[idx])) if np.isfinite(v[idx]).any() else float("nan") for k, v in vals.items()}

    point = mean_over(np.arange(len(uniq)))
    cis = bootstrap_ci(mean_over, len(uniq), n_boot, ci, seed)
    return {k: {"value": point[k], "ci_low": cis.get(k, (np.nan, np.nan))[0],
                "ci_high": cis.get(k, (np.nan, np.nan))[1], "n_defined": int(np.isfinite(vals[k]).sum()),
                "n_cases": len(rows)} for k in keys}
