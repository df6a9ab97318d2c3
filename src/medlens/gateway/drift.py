"""Rolling drift of what reaches a run, against what it was trained and tested on.

Per run, over the last ``window`` series routed to it (refused ones included: a shift of the inputs is what
refusals are made of):

- **input**: the mean intensity histogram of the prepared inputs against the training profile's
  (``RunMeta.input_profile``: the same bins, ``run.profile.histogram``); the population stability index
  ``PSI = sum((a - e) * ln(a / e))`` and the KS statistic of the two binned distributions (largest gap of
  their cumulative sums);
- **output**: the predicted probabilities (binary runs) against the run's own test-split probabilities
  (``predictions.csv``; validation when there is no test split): PSI over 10 equal bins of [0, 1] and the
  two-sample KS statistic (scipy).

Each statistic is a Prometheus gauge; passing its threshold gives one alert (a console line, an audit event)
until it comes back under. Common reading of PSI: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a shift.
"""

from __future__ import annotations

import csv
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

from medlens.run.profile import histogram

EPS = 1e-4
OUTPUT_BINS = 10


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (each normalised here)."""
    a = np.asarray(actual, np.float64) + EPS
    e = np.asarray(expected, np.float64) + EPS
    a, e = a / a.sum(), e / e.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def binned_ks(actual: np.ndarray, expected: np.ndarray) -> float:
    """KS statistic of two distributions over the same ordered bins: the largest gap of their CDFs."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.cumsum(a / max(a.sum(), 1e-12)) - np.cumsum(e / max(e.sum(), 1e-12)))))


def reference_probabilities(run_dir: str | Path) -> np.ndarray | None:
    """The run's test-split probabilities (validation when it has no test split) from ``predictions.csv``;
    None when there is no such file or no single ``prob`` column (not a binary classifier)."""
    p = Path(run_dir) / "predictions.csv"
    if not p.is_file():
        return None
    by_split: dict[str, list[float]] = {}
    with open(p, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                v = float(row["prob"])
            except (KeyError, TypeError, ValueError):
                return None
            if math.isfinite(v) and 0.0 <= v <= 1.0:
                by_split.setdefault(row.get("split") or "", []).append(v)
    ref = by_split.get("test") or by_split.get("val")
    return np.asarray(ref, np.float64) if ref else None


@dataclass
class DriftMonitor:
    """The window of one run and its references; ``add`` returns the statistics once ``min_samples`` are in."""

    hist_ref: np.ndarray | None
    lo: float
    hi: float
    prob_ref: np.ndarray | None
    window: int = 50
    min_samples: int = 10
    hists: deque = field(default_factory=deque)
    probs: deque = field(default_factory=deque)

    @classmethod
    def of_run(cls, run, window: int, min_samples: int) -> "DriftMonitor":
        prof = run.meta.input_profile
        hist = np.asarray(prof.hist, np.float64) if prof is not None else None
        lo, hi = (prof.hist_range if prof is not None else (0.0, 1.0))
        return cls(hist, float(lo), float(hi), reference_probabilities(run.dir), window, min_samples,
                   deque(maxlen=window), deque(maxlen=window))

    def input_histogram(self, prepared: np.ndarray) -> np.ndarray | None:
        return histogram(prepared, self.lo, self.hi) if self.hist_ref is not None else None

    def add(self, hist: np.ndarray | None, probability: float | None) -> dict[str, float]:
        """One series: its inputs' mean histogram (None: not measured) and its probability (None: refused or
        not binary). The statistics over the window, for those with enough samples."""
        if hist is not None:
            self.hists.append(np.asarray(hist, np.float64))
        if probability is not None and math.isfinite(probability):
            self.probs.append(float(probability))
        out: dict[str, float] = {}
        if self.hist_ref is not None and len(self.hists) >= self.min_samples:
            mean = np.mean(np.stack(list(self.hists)), axis=0)
            out["input_psi"] = psi(mean, self.hist_ref)
            out["input_ks"] = binned_ks(mean, self.hist_ref)
        if self.prob_ref is not None and len(self.probs) >= self.min_samples:
            w = np.asarray(self.probs)
            edges = np.linspace(0.0, 1.0, OUTPUT_BINS + 1)
            out["output_psi"] = psi(np.histogram(w, edges)[0], np.histogram(self.prob_ref, edges)[0])
            out["output_ks"] = float(np.asarray(ks_2samp(w, self.prob_ref))[0])
        return out
