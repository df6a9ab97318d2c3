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
- the 95% confidence intervals come from a bootstrap over scans (``evaluation.metrics.bootstrap_ci``).

A scan with no row in the annotations is a scan without nodules (LUNA16 lists every nodule it accepts), but it
may also be a wrong file: it is counted, and the caller is warned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medlens.errors import DataError, MedlensWarning

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0  # the official script's diameter for excluded findings marked -1
COORDS = ["coordX", "coordY", "coordZ"]


def _read(path: str | Path, need: list[str], what: str) -> pd.DataFrame:
    from medlens.data.base import read_csv_checked

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


def match_scan(uid: str, cands: pd.DataFrame, nodules: pd.DataFrame, excluded: pd.DataFrame) -> ScanScore:
    """Hits, false positives and ignored candidates of one scan (the rules in the module docstring)."""
    pts = cands[COORDS].to_numpy(float).reshape(-1, 3)
    prob = cands["probability"].to_numpy(float)
    on_nodule = np.zeros(len(pts), bool)
    scores, hits = [], []
    for n in nodules.itertuples(index=False):
        r2 = (float(n.diameter_mm) / 2.0) ** 2
        inside = ((pts - [n.coordX, n.coordY, n.coordZ]) ** 2).sum(1) < r2
        on_nodule |= inside
        scores.append(prob[inside].max() if inside.any() else -np.inf)
        hits.append(int(inside.sum()))
    on_excluded = np.zeros(len(pts), bool)
    for e in excluded.itertuples(index=False):
        d = float(e.diameter_mm)
        d = d if d > 0 else EXCLUDED_DEFAULT_DIAMETER_MM
        on_excluded |= ((pts - [e.coordX, e.coordY, e.coordZ]) ** 2).sum(1) < (d / 2.0) ** 2
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


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates=FP_RATES) -> np.ndarray:
    """Linear interpolation of the curve at ``rates`` (held at the last sensitivity beyond the curve's end).
    At an FP rate the curve reaches at several thresholds, the highest sensitivity there counts."""
    if not np.isfinite(sens).all():
        return np.full(len(rates), np.nan)
    xs = np.unique(fps)
    ys = np.array([sens[fps == x].max() for x in xs])
    return np.interp(np.asarray(rates, float), xs, ys)


def _cpm_of(scans: list[ScanScore]) -> dict[str, float]:
    fps, sens, _ = froc_curve(scans)
    s = sensitivity_at(fps, sens)
    out = {f"sens@{r:g}": float(v) for r, v in zip(FP_RATES, s)}
    out["cpm"] = float(np.mean(s))
    return out


def froc(candidates: pd.DataFrame, annotations: pd.DataFrame, excluded: pd.DataFrame | None = None,
         scans: list[str] | None = None, n_boot: int = 1000, seed: int = 0, source: str = "annotations") -> FrocResult:
    """Score ``candidates`` (seriesuid, coordX/Y/Z, probability) against LUNA16 ``annotations`` (and the
    ``excluded`` findings) over ``scans`` (default: every scan the candidates name)."""
    from medlens.evaluation.metrics import bootstrap_ci

    excluded = excluded if excluded is not None else pd.DataFrame(columns=["seriesuid"] + COORDS + ["diameter_mm"])
    uids = list(dict.fromkeys(list(scans or []) + candidates["seriesuid"].astype(str).tolist()))
    if not uids:
        raise DataError("no scan to score: the candidates file is empty and no scan list was given")
    annotated = set(annotations["seriesuid"].astype(str))
    unannotated = [u for u in uids if u not in annotated]
    if unannotated:
        warnings.warn(f"{len(unannotated)} of {len(uids)} scan(s) have no row in {source} (e.g. ...{unannotated[0][-12:]}): "
                      "counted as scans without nodules (LUNA16 lists every nodule it accepts)", MedlensWarning)
    per_scan = [match_scan(u, candidates[candidates.seriesuid == u], annotations[annotations.seriesuid == u],
                           excluded[excluded.seriesuid == u]) for u in uids]
    fps, sens, thr = froc_curve(per_scan)
    s = sensitivity_at(fps, sens)
    ci = bootstrap_ci(lambda idx: _cpm_of([per_scan[i] for i in idx]), len(per_scan), n_boot, seed=seed)
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
               note: str | None = None) -> FrocResult:
    """``froc`` on LUNA16 CSV files (several candidates files are concatenated), with the plot written to ``plot``."""
    files = [candidates] if isinstance(candidates, (str, Path)) else list(candidates)
    cands = pd.concat([read_detections(f) for f in files], ignore_index=True)
    res = froc(cands, read_annotations(annotations), read_annotations(excluded) if excluded else None, scans,
               n_boot, seed, source=Path(annotations).name)
    if plot is not None:
        res.plot = plot_froc(res, plot, note)
    return res


def plot_froc(res: FrocResult, path: str | Path, note: str | None = None) -> Path:
    """The FROC curve on a log FP axis (1/8 .. 8 per scan), the seven CPM points with their bootstrap CIs."""
    import matplotlib.pyplot as plt

    from medlens.evaluation.plots import _save

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    if np.isfinite(res.sens).all():
        xs = np.unique(res.fps)  # the curve the CPM interpolates: highest sensitivity at each FP rate, joined
        ys = np.array([res.sens[res.fps == x].max() for x in xs])
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
    return _save(fig, Path(path))
