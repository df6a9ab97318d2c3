"""FROC scoring of nodule detections with the LUNA16 challenge's rules (Setio et al., Med Image Anal 2017, and the
challenge's evaluation script ``noduleCADEvaluationLUNA16.py``, re-implemented here from its description):

- a candidate **hits** a nodule of ``annotations.csv`` when its distance to the nodule's centre is strictly less
  than the nodule's radius (``diameter_mm / 2``; the official script compares squared distances with ``<``, so
  a candidate exactly on the boundary is not a hit);
- several candidates on one nodule are one hit (its score is their highest probability) and none of them is a
  false positive;
- a candidate on a finding of ``annotations_excluded.csv`` (and on no nodule) is ignored: neither a hit nor a
  false positive. Excluded findings without a diameter (``-1``) count with 10 mm, as in the official script;
- every other candidate is a false positive. Sensitivity = detected nodules / all nodules of the scans scored;
  false positives per scan = false positives / number of scans (scans without any candidate count too);
- the FROC curve sweeps the probability threshold; the sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false
  positives per scan is read off it by linear interpolation, and the **CPM** is their mean;
- the 95% confidence intervals come from a percentile bootstrap over scans (the resamples of
  ``evaluation.metrics.bootstrap_ci``), every resample's curve computed at once with array operations.

A scan with no row in the annotations is a scan without nodules (LUNA16 lists every nodule it accepts), but it
may also be a wrong file: it is counted, and the caller is warned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medlens.data.base import read_csv_checked
from medlens.errors import DataError, MedlensWarning
from medlens.evaluation.plots import save_figure

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0  # the official script's diameter for excluded findings marked -1
COORDS = ["coordX", "coordY", "coordZ"]


def _read(path: str | Path, need: list[str], what: str) -> pd.DataFrame:
    df = read_csv_checked(path, ["seriesuid"] + need, what).copy()
    for c in need:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise DataError(f"column '{c}' is not numeric", path)
        if not np.isfinite(df[c].to_numpy(float)).all():
            raise DataError(f"column '{c}' has empty or non-finite values", path)
    df["seriesuid"] = df["seriesuid"].astype(str)
    return df


def read_detections(path: str | Path) -> pd.DataFrame:
    """A LUNA16 candidates file with scores: ``seriesuid,coordX,coordY,coordZ,probability``."""
    return _read(path, COORDS + ["probability"], "LUNA16 candidates CSV (seriesuid,coordX,coordY,coordZ,probability)")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """LUNA16 ``annotations.csv`` / ``annotations_excluded.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``."""
    return _read(path, COORDS + ["diameter_mm"], "LUNA16 annotations CSV (seriesuid,coordX,coordY,coordZ,diameter_mm)")


@dataclass
class ScanScore:
    """One scan's matching: the score of each nodule (``-inf`` when no candidate hits it) and of each false
    positive."""

    seriesuid: str
    nodule_scores: np.ndarray
    fp_scores: np.ndarray
    ignored: int = 0
    hits_per_nodule: list[int] = field(default_factory=list)


@dataclass
class FrocResult:
    n_scans: int
    n_nodules: int
    n_candidates: int
    n_ignored: int
    fps: np.ndarray            # the curve: false positives per scan ...
    sens: np.ndarray           # ... and sensitivity, from the strictest threshold to the loosest
    sensitivity: dict[float, float]
    cpm: float
    ci: dict[str, tuple[float, float]]
    operating_points: list[dict]   # per FP rate: threshold, sensitivity, hits and FPs per scan there
    scans: list[ScanScore]
    unannotated: list[str]         # scans with no row in the annotations (counted as nodule-free)
    plot: Path | None = None

    def as_dict(self) -> dict:
        return {"n_scans": self.n_scans, "n_nodules": self.n_nodules, "n_candidates": self.n_candidates,
                "n_ignored_on_excluded": self.n_ignored, "cpm": self.cpm,
                "sensitivity": {str(k): v for k, v in self.sensitivity.items()},
                "ci95": {k: list(v) for k, v in self.ci.items()},
                "operating_points": [dict(o, threshold=o["threshold"] if np.isfinite(o["threshold"]) else None)
                                     for o in self.operating_points],  # inf (no candidate kept) is not JSON
                "scans_without_annotations": len(self.unannotated)}


def _centres(df: pd.DataFrame) -> np.ndarray:
    """(N, 3) world coordinates (mm) of a findings table, in row order."""
    return df[COORDS].to_numpy(float).reshape(-1, 3)


def _diameters(df: pd.DataFrame) -> list[float]:
    return [float(d) for d in df["diameter_mm"].to_numpy(float)]


def match_scan(uid: str, cands: pd.DataFrame, nodules: pd.DataFrame, excluded: pd.DataFrame) -> ScanScore:
    """Hits, false positives and ignored candidates of one scan (the rules in the module docstring)."""
    pts = cands[COORDS].to_numpy(float).reshape(-1, 3)
    prob = cands["probability"].to_numpy(float)
    on_nodule = np.zeros(len(pts), bool)
    scores, hits = [], []
    for centre, diameter in zip(_centres(nodules), _diameters(nodules)):
        r2 = (diameter / 2.0) ** 2
        inside = ((pts - centre) ** 2).sum(1) < r2
        on_nodule |= inside
        scores.append(prob[inside].max() if inside.any() else -np.inf)
        hits.append(int(inside.sum()))
    on_excluded = np.zeros(len(pts), bool)
    for centre, d in zip(_centres(excluded), _diameters(excluded)):
        d = d if d > 0 else EXCLUDED_DEFAULT_DIAMETER_MM
        on_excluded |= ((pts - centre) ** 2).sum(1) < (d / 2.0) ** 2
    fp = ~on_nodule & ~on_excluded
    return ScanScore(uid, np.asarray(scores, float), prob[fp], int((~on_nodule & on_excluded).sum()), hits)


def froc_curve(scans: list[ScanScore]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPs per scan, sensitivity, threshold) at every distinct score, from (0, 0) at an infinite threshold;
    sensitivity is NaN when the scans hold no nodule."""
    nod = np.concatenate([s.nodule_scores for s in scans]) if scans else np.zeros(0)
    fps_s = np.concatenate([s.fp_scores for s in scans]) if scans else np.zeros(0)
    found = nod[np.isfinite(nod)]
    thr = np.unique(np.concatenate([found, fps_s]))[::-1]
    n_scans = max(len(scans), 1)
    fp_counts = np.searchsorted(-np.sort(fps_s)[::-1], -thr, side="right") if len(fps_s) else np.zeros(len(thr))
    tp_counts = np.searchsorted(-np.sort(found)[::-1], -thr, side="right") if len(found) else np.zeros(len(thr))
    fps = np.concatenate([[0.0], np.asarray(fp_counts, float) / n_scans])
    sens = np.concatenate([[0.0], np.asarray(tp_counts, float)]) / len(nod) if len(nod) else np.full(len(thr) + 1, np.nan)
    return fps, sens, np.concatenate([[np.inf], thr])


def _upper_curve(fps: np.ndarray, sens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct FP rate of the curve and the highest sensitivity the curve reaches there."""
    xs, inverse = np.unique(fps, return_inverse=True)
    ys = np.full(len(xs), -np.inf)
    np.maximum.at(ys, inverse.reshape(-1), sens)
    return xs, ys


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """Linear interpolation of the curve at ``rates`` (held at the last sensitivity beyond the curve's end).
    At an FP rate the curve reaches at several thresholds, the highest sensitivity there counts."""
    if not np.isfinite(sens).all():
        return np.full(len(rates), np.nan)
    xs, ys = _upper_curve(fps, sens)
    return np.interp(np.asarray(rates, float), xs, ys)


def _cpm_of(scans: list[ScanScore]) -> dict[str, float]:
    """The figures of one resample of scans: the reference that ``_bootstrap`` computes for all resamples at once."""
    fps, sens, _ = froc_curve(scans)
    s = sensitivity_at(fps, sens)
    out = {f"sens@{r:g}": float(v) for r, v in zip(FP_RATES, s)}
    out["cpm"] = float(np.mean(s))
    return out


def _resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n): how often each scan is drawn in each resample; the draws are ``bootstrap_ci``'s, one
    ``rng.integers(0, n, n)`` per resample from ``default_rng(seed)``, so both see the same resamples."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, n) for _ in range(n_boot)]) if n_boot else np.zeros((0, n), np.int64)
    counts = np.zeros((n_boot, n), np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), idx.reshape(-1)), 1)
    return counts


def _bootstrap(scans: list[ScanScore], n_boot: int, seed: int, ci: float = 0.95,
               progress: Callable | None = None, chunk_elements: int = 1 << 23) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap over scans of the seven sensitivities and the CPM, every resample's FROC curve computed
    with array operations: a resample is a count per scan, the pooled false positives and hits of a resample at a
    threshold are count-weighted cumulative sums over the scores sorted once. The result equals
    ``bootstrap_ci(lambda idx: _cpm_of([scans[i] for i in idx]), len(scans), n_boot, ci, seed)``, the loop over
    resamples it replaces (``tests/security/test_decoders_and_crashes.py`` compares them)."""
    n = len(scans)
    if n_boot <= 0 or n == 0:
        return {}
    counts = _resample_counts(n, n_boot, seed)
    fp_scan = np.concatenate([np.full(len(s.fp_scores), i) for i, s in enumerate(scans)]).astype(np.int64)
    fp_score = np.concatenate([s.fp_scores for s in scans]).astype(float)
    found = [s.nodule_scores[np.isfinite(s.nodule_scores)] for s in scans]
    tp_scan = np.concatenate([np.full(len(f), i) for i, f in enumerate(found)]).astype(np.int64)
    tp_score = np.concatenate(found).astype(float) if found else np.zeros(0)
    n_nod = np.array([len(s.nodule_scores) for s in scans], np.int64)
    # every threshold any resample can have (a resample's own thresholds are a subset: the others repeat a point)
    thr = np.unique(np.concatenate([tp_score, fp_score]))[::-1]
    fp_order, tp_order = np.argsort(-fp_score, kind="stable"), np.argsort(-tp_score, kind="stable")
    fp_scan, tp_scan = fp_scan[fp_order], tp_scan[tp_order]
    # entries at or above each threshold (froc_curve's searchsorted), 0 for the infinite threshold first
    fp_at = np.concatenate([[0], np.searchsorted(-fp_score[fp_order], -thr, side="right")])
    tp_at = np.concatenate([[0], np.searchsorted(-tp_score[tp_order], -thr, side="right")])
    rates = np.asarray(FP_RATES, float)
    # the largest pooled FP count k with k / n <= rate, as froc_curve's float division gives it
    k_max = np.floor(rates * n).astype(np.int64)
    for j in range(len(rates)):
        while (k_max[j] + 1) / n <= rates[j]:
            k_max[j] += 1
        while k_max[j] >= 0 and k_max[j] / n > rates[j]:
            k_max[j] -= 1
    out = np.empty((n_boot, len(rates)))
    step = max(1, chunk_elements // max(len(fp_scan), len(thr), 1))
    for a in range(0, n_boot, step):
        w = counts[a:a + step]
        c = len(w)
        cum_fp = np.zeros((c, len(fp_scan) + 1), np.int64)
        np.cumsum(w[:, fp_scan], axis=1, out=cum_fp[:, 1:])
        fp = cum_fp[:, fp_at]                                   # (c, thresholds + 1): pooled FPs
        cum_tp = np.zeros((c, len(tp_scan) + 1), np.int64)
        np.cumsum(w[:, tp_scan], axis=1, out=cum_tp[:, 1:])
        tp = cum_tp[:, tp_at]
        total = (w * n_nod).sum(axis=1).astype(float)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.where(total > 0, tp / np.where(total > 0, total, 1), np.nan)
        fps = fp / n
        m = fp.shape[1]
        # a row-wise searchsorted on the non-decreasing FP counts: shift each row above the previous one
        shift = (np.arange(c, dtype=np.int64) * (max(int(fp[:, -1].max()), int(k_max.max())) + 2))[:, None]
        flat = (fp + shift).reshape(-1)
        rows = np.arange(c)
        for j, r in enumerate(rates):
            i = np.searchsorted(flat, k_max[j] + shift[:, 0], side="right") - rows * m - 1  # last point with fps <= r
            x0, y0 = fps[rows, i], sens[rows, i]
            nxt = np.minimum(i + 1, m - 1)
            k = np.searchsorted(flat, fp[rows, nxt] + shift[:, 0], side="right") - rows * m - 1
            x1, y1 = fps[rows, nxt], sens[rows, k]  # the next FP rate and the highest sensitivity there
            with np.errstate(invalid="ignore", divide="ignore"):
                v = (y1 - y0) / (x1 - x0) * (r - x0) + y0   # np.interp's formula
            out[a:a + c, j] = np.where((i == m - 1) | (x0 == r), y0, v)
        if progress:
            progress(min(a + c, n_boot), n_boot, "bootstrap")
    draws = {f"sens@{r:g}": out[:, j] for j, r in enumerate(FP_RATES)}
    draws["cpm"] = np.array([float(np.mean(row)) for row in out])
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    cis = {}
    for key, vals in draws.items():
        finite = vals[np.isfinite(vals)]
        cis[key] = ((float(np.percentile(finite, lo)), float(np.percentile(finite, hi))) if len(finite)
                    else (float("nan"),) * 2)
    return cis


def froc(candidates: pd.DataFrame, annotations: pd.DataFrame, excluded: pd.DataFrame | None = None,
         scans: list[str] | None = None, n_boot: int = 1000, seed: int = 0, source: str = "annotations",
         progress: Callable | None = None) -> FrocResult:
    """Score ``candidates`` (seriesuid, coordX/Y/Z, probability) against LUNA16 ``annotations`` (and the
    ``excluded`` findings) over ``scans`` (default: every scan the candidates name). ``progress(done, total,
    what)`` is called as scans are matched ("scans") and resamples computed ("bootstrap")."""
    excluded = excluded if excluded is not None else pd.DataFrame(columns=["seriesuid"] + COORDS + ["diameter_mm"])
    uids = list(dict.fromkeys(list(scans or []) + candidates["seriesuid"].astype(str).tolist()))
    if not uids:
        raise DataError("no scan to score: the candidates file is empty and no scan list was given")
    annotated = set(annotations["seriesuid"].astype(str))
    unannotated = [u for u in uids if u not in annotated]
    if unannotated:
        warnings.warn(f"{len(unannotated)} of {len(uids)} scan(s) have no row in {source} (e.g. ...{unannotated[0][-12:]}): "
                      "counted as scans without nodules (LUNA16 lists every nodule it accepts)", MedlensWarning)
    def by_scan(df: pd.DataFrame) -> dict[str, pd.DataFrame]:  # one pass, not one comparison of every row per scan
        return {str(k): g for k, g in df.groupby(df["seriesuid"].astype(str), sort=False)}

    cands, nods, excl = by_scan(candidates), by_scan(annotations), by_scan(excluded)
    empty_c, empty_a, empty_e = candidates.head(0), annotations.head(0), excluded.head(0)
    per_scan = []
    for i, u in enumerate(uids):
        per_scan.append(match_scan(u, cands.get(u, empty_c), nods.get(u, empty_a), excl.get(u, empty_e)))
        if progress and (i % 50 == 0 or i == len(uids) - 1):
            progress(i + 1, len(uids), "scans")
    fps, sens, thr = froc_curve(per_scan)
    s = sensitivity_at(fps, sens)
    ci = _bootstrap(per_scan, n_boot, seed, progress=progress)
    ops = []
    for r in FP_RATES:  # the loosest threshold whose pooled FP rate stays within r
        ok = np.flatnonzero(fps <= r)
        t = float(thr[ok[-1]])
        ops.append({"fp_rate": r, "threshold": t, "sensitivity": float(sensitivity_at(fps, sens, [r])[0]),
                    "fps": {p.seriesuid: int((p.fp_scores >= t).sum()) for p in per_scan},
                    "nodules_hit": {p.seriesuid: int((p.nodule_scores >= t).sum()) for p in per_scan}})
    n_nod = int(sum(len(p.nodule_scores) for p in per_scan))
    return FrocResult(len(uids), n_nod, int(candidates.seriesuid.isin(uids).sum()), sum(p.ignored for p in per_scan),
                      fps, sens, dict(zip(FP_RATES, map(float, s))), float(np.mean(s)), ci, ops, per_scan, unannotated)


def froc_files(candidates: str | Path | list, annotations: str | Path, excluded: str | Path | None = None,
               scans: list[str] | None = None, n_boot: int = 1000, seed: int = 0, plot: str | Path | None = None,
               note: str | None = None, progress: Callable | None = None) -> FrocResult:
    """``froc`` on LUNA16 CSV files (several candidates files are concatenated), with the plot written to ``plot``."""
    files = [candidates] if isinstance(candidates, (str, Path)) else list(candidates)
    cands = pd.concat([read_detections(f) for f in files], ignore_index=True)
    res = froc(cands, read_annotations(annotations), read_annotations(excluded) if excluded else None, scans,
               n_boot, seed, source=Path(annotations).name, progress=progress)
    if plot is not None:
        res.plot = plot_froc(res, plot, note)
    return res


def plot_froc(res: FrocResult, path: str | Path, note: str | None = None) -> Path:
    """The FROC curve on a log FP axis (1/8 .. 8 per scan), the seven CPM points with their bootstrap CIs."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if np.isfinite(res.sens).all():
        xs, ys = _upper_curve(res.fps, res.sens)  # the curve the CPM interpolates: highest sensitivity per FP rate
        fine = np.geomspace(FP_RATES[0] / 2, FP_RATES[-1] * 1.5, 200)
        ax.plot(fine, np.interp(fine, xs, ys), color="C0", label=f"FROC (CPM {res.cpm:.3f})")
        ys = [res.sensitivity[r] for r in FP_RATES]
        lo = [res.ci.get(f"sens@{r:g}", (np.nan, np.nan))[0] for r in FP_RATES]
        hi = [res.ci.get(f"sens@{r:g}", (np.nan, np.nan))[1] for r in FP_RATES]
        err = np.nan_to_num(np.abs(np.array([np.subtract(ys, lo), np.subtract(hi, ys)])))
        ax.errorbar(FP_RATES, ys, yerr=err, fmt="o", color="C1", capsize=3, label="CPM points (95% CI, scans)")
    else:
        ax.text(0.5, 0.5, "no nodule in the scans scored:\nsensitivity undefined", ha="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FP_RATES[0] / 2, FP_RATES[-1] * 1.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{res.n_scans} scan(s), {res.n_nodules} nodule(s)" + (f"\n{note}" if note else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, Path(path))
