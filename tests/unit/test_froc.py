"""The LUNA16 FROC scorer on cases built by hand, where every figure is worked out in the comments."""

import warnings

import numpy as np
import pandas as pd
import pytest

from medlens.errors import DataError, MedlensWarning
from medlens.evaluation.froc import FP_RATES, froc, froc_files, read_detections

A, B = "1.2.3.scanA", "1.2.3.scanB"


def _cands(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"])


def _ann(rows):
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


ANN = _ann([(A, 0, 0, 0, 10.0),      # N1: radius 5 mm
            (A, 50, 0, 0, 6.0)])     # N2: radius 3 mm, never found
EXC = _ann([(A, 0, 50, 0, -1.0)])    # an excluded finding without diameter: 10 mm (radius 5) as in the official script
CANDS = _cands([(A, 3, 4, 0, 0.9),       # distance exactly 5 = N1's radius: not a hit (strict <), a false positive
                (A, 1, 0, 0, 0.8),       # inside N1: a hit
                (A, 0, 1, 0, 0.3),       # inside N1 again: the same hit, not a false positive
                (A, 0, 52, 0, 0.95),     # on the excluded finding: ignored
                (A, 100, 100, 100, 0.5), # false positive
                (B, 0, 0, 0, 0.7),       # scan B has no nodule: false positives
                (B, 9, 9, 9, 0.2)])


def test_hand_built_case():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)  # scan B has no annotation row
        res = froc(CANDS, ANN, EXC, n_boot=0)
    # nodules: N1 score max(0.8, 0.3) = 0.8, N2 missed; false positives 0.9, 0.5 (A), 0.7, 0.2 (B); 2 scans.
    # Threshold sweep (FPs/scan, sensitivity): inf (0, 0); 0.9 (0.5, 0); 0.8 (0.5, 0.5); 0.7 (1, 0.5);
    # 0.5 (1.5, 0.5); 0.2 (2, 0.5). Highest sensitivity per FP rate: (0, 0), (0.5, 0.5), (1, .5), (1.5, .5), (2, .5).
    # Linear interpolation: 1/8 -> 0.125, 1/4 -> 0.25, 1/2 .. 8 -> 0.5 (held beyond 2).
    expected = [0.125, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert [res.sensitivity[r] for r in FP_RATES] == pytest.approx(expected)
    assert res.cpm == pytest.approx((0.125 + 0.25 + 5 * 0.5) / 7)
    assert res.n_scans == 2 and res.n_nodules == 2 and res.n_ignored == 1
    a = res.scans[0]
    assert a.hits_per_nodule == [2, 0]  # two candidates on N1 (one hit), none on N2
    assert sorted(a.fp_scores) == [0.5, 0.9] and sorted(res.scans[1].fp_scores) == [0.2, 0.7]
    # the operating point of 1 FP/scan: the loosest threshold with at most 2 FPs over 2 scans is 0.7:
    # scan A then has one FP (0.9), scan B one (0.7), and N1 (0.8) is hit
    op = next(o for o in res.operating_points if o["fp_rate"] == 1.0)
    assert op["threshold"] == pytest.approx(0.7) and op["fps"] == {A: 1, B: 1} and op["nodules_hit"] == {A: 1, B: 0}


def test_just_inside_the_boundary_is_a_hit():
    c = CANDS.astype({"coordX": float, "coordY": float})
    c.loc[0, ["coordX", "coordY"]] = [3, 3.999]  # distance 4.9992 < 5: now N1 is hit at 0.9 and it is no FP
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res = froc(c, ANN, EXC, n_boot=0)
    # nodules: N1 0.9, N2 missed; FPs 0.5 (A), 0.7, 0.2 (B). Sweep: 0.9 (0, .5); 0.7 (.5, .5); 0.5 (1, .5); 0.2 (1.5, .5)
    assert [res.sensitivity[r] for r in FP_RATES] == pytest.approx([0.5] * 7)
    assert res.cpm == pytest.approx(0.5)


def test_candidate_on_an_excluded_finding_counts_when_the_exclusion_is_dropped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res = froc(CANDS, ANN, None, n_boot=0)
    # without the exclusion the 0.95 mark is a false positive: sweep 0.95 (.5, 0); 0.9 (1, 0); 0.8 (1, .5); ...
    # so 1/8, 1/4, 1/2 -> 0, 1 -> 0.5 (the top of the step at 1 FP/scan), 2, 4, 8 -> 0.5
    assert [res.sensitivity[r] for r in FP_RATES] == pytest.approx([0, 0, 0, 0.5, 0.5, 0.5, 0.5])
    assert res.n_ignored == 0


def test_scan_without_annotations_warns_and_counts():
    with pytest.warns(MedlensWarning, match="1 of 2 scan\\(s\\) have no row"):
        res = froc(CANDS, ANN, EXC, n_boot=0)
    assert res.n_scans == 2 and res.unannotated == [B]
    # a scan listed without any candidate still counts: 3 scans halve... FPs/scan = 4 / 3 at the loosest threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res3 = froc(CANDS, ANN, EXC, scans=["1.2.3.scanC"], n_boot=0)
    assert res3.n_scans == 3 and res3.fps.max() == pytest.approx(4 / 3)


def test_bootstrap_over_scans_brackets_the_estimate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res = froc(CANDS, ANN, EXC, n_boot=200, seed=1)
    lo, hi = res.ci["cpm"]
    # resamples of two scans: {A, A} gives CPM (0.25+0.5+0.5*5)/7 ... every draw lies in [0, 0.5]
    assert 0 <= lo <= res.cpm <= hi <= 0.5


def test_missing_columns_is_one_line(tmp_path):
    p = tmp_path / "cands.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ\n1.2,0,0,0\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['probability'\]") as e:
        read_detections(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_real_lidc_0001_annotations(data_root, tmp_path):
    """The official row of LIDC-IDRI-0001 (23.35 mm at (56.21, 86.34, -115.87)) and its official excluded findings."""
    luna = data_root / "luna16"
    ann = pd.read_csv(luna / "annotations.csv")
    uid, x, y, z, d = ann.iloc[0]
    exc = pd.read_csv(luna / "luna16_official_csv" / "annotations_excluded.csv")
    e = exc[exc.seriesuid == uid].iloc[0]
    assert np.linalg.norm([e.coordX - x, e.coordY - y, e.coordZ - z]) > d  # a finding away from the nodule
    rows = [(uid, x + 11.6, y, z, 0.6),            # 11.6 mm < radius 11.675: a hit
            (uid, x, y + 11.7, z, 0.99),           # 11.7 mm > radius: a false positive
            (uid, e.coordX, e.coordY, e.coordZ, 0.8),  # on an excluded finding: ignored
            (uid, x - 60, y, z, 0.1)]              # a false positive
    _cands(rows).to_csv(tmp_path / "c.csv", index=False)
    res = froc_files(tmp_path / "c.csv", luna / "annotations.csv", luna / "luna16_official_csv" / "annotations_excluded.csv",
                     n_boot=0, plot=tmp_path / "froc.png")
    # 1 scan: FPs 0.99, 0.1; nodule 0.6. Sweep: 0.99 (1, 0); 0.6 (1, 1); 0.1 (2, 1): 1/8, 1/4, 1/2 on the line
    # from (0, 0) to (1, 1): 0.125, 0.25, 0.5; from 1 FP/scan on: 1
    assert [res.sensitivity[r] for r in FP_RATES] == pytest.approx([0.125, 0.25, 0.5, 1, 1, 1, 1])
    assert res.n_ignored == 1 and res.n_nodules == 1 and (tmp_path / "froc.png").stat().st_size > 1000
