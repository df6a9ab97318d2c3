"""Cross-validation inside the plan (issue 30, item 1) and the honest 0.5 operating point (item 5).

- the folds: patient-disjoint, every train+val case in exactly one, deterministic; the pool reads the right images;
- the planner: small data cross-validate (k from the budget's arithmetic, done by hand here), large data keep the
  holdout and say why; binary imbalance keeps the plain loss;
- a cross-validated run: its threshold is Youden's on the out-of-fold predictions, recomputed here by hand from
  the saved fold models; the test split is never read while the folds are fitted, nor while a plan is made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clirun import medlens
from plan_fixtures import fingerprint as _fp
from medlens.engine.planner import MAX_EPOCH_FACTOR, RESERVE, SAFETY


# ------------------------------------------------------------------ folds
def test_cv_folds_are_patient_disjoint_and_cover_train_val_once():
    from medlens.data.base import ArrayDataset, SplitData
    from medlens.data.splits import Pooled, cv_folds, cv_splits

    rng = np.random.default_rng(3)
    # 40 patients with 1..4 images each, split over train (first 30 patients) and val (the rest)
    pids = np.repeat([f"p{i}" for i in range(40)], rng.integers(1, 5, 40))
    labels = np.array([int(p[1:]) % 3 == 0 for p in pids], np.int64)
    n_tr = int(np.sum([int(p[1:]) < 30 for p in pids]))
    images = rng.integers(0, 255, (len(pids), 1, 6, 6)).astype(np.uint8)
    tr = ArrayDataset(images[:n_tr], labels[:n_tr], "binary", ["no", "yes"], pids[:n_tr], name="t/train")
    va = ArrayDataset(images[n_tr:], labels[n_tr:], "binary", ["no", "yes"], pids[n_tr:], name="t/val")
    pool = Pooled([tr, va])
    assert len(pool) == len(pids) and list(pool.patient_ids) == list(pids)
    folds = cv_folds(pool.labels, pool.patient_ids, 5, seed=1)
    assert len(folds) == 5 and all(len(f) for f in folds)
    everyone = np.sort(np.concatenate(folds))
    assert np.array_equal(everyone, np.arange(len(pids)))                 # each case exactly once
    owners = [set(pids[f]) for f in folds]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not owners[i] & owners[j], (i, j)                        # no patient in two folds
    again = cv_folds(pool.labels, pool.patient_ids, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    # a view of the pool reads the requested cases, in the requested order, across train and val
    view = pool.subset(folds[2])
    order = np.arange(len(view))[::-1]
    x, y = view.batch(order)
    want = folds[2][order]
    assert torch.equal(x, torch.from_numpy(images[want]).float() / 255)
    assert np.array_equal(y.numpy(), labels[want])
    with pytest.raises(Exception, match="cannot be dealt into 5"):
        cv_folds(labels[:3], pids[:3], 5)
    # each fold model's data: the other folds to train on, its own fold held out, the data's other fields kept
    test = ArrayDataset(images[:4], labels[:4], "binary", ["no", "yes"], pids[:4], name="t/test")
    data = SplitData(train=tr, val=va, test=test, split_method="official", positive_class="yes")
    sealed = ArrayDataset(images[:2], labels[:2], "binary", ["no", "yes"], pids[:2], name="sealed")
    _, cv, splits = cv_splits(data, 5, seed=1, test=sealed)
    assert all(np.array_equal(a, b) for a, b in zip(cv, folds)) and len(splits) == 5
    for f, s in zip(folds, splits):
        assert list(s.val.patient_ids) == list(pids[f])
        assert list(s.train.patient_ids) == list(pids[np.setdiff1d(np.arange(len(pids)), f)])
        assert s.test is sealed and s.positive_class == "yes" and s.split_method == "official"
    assert cv_splits(data, 5, seed=1)[2][0].test is test


# ------------------------------------------------------------------ planner


TRAIN_RATE, VAL_RATE = 400.0, 2000.0   # img/s of the probe below


def _planner(fp, budget: float):
    """A planner 20 s into planning, whose report explains with a fixed method on 8 test images (an explanation
    section far below 5% of any budget here: 240 inferences per image and member), and a probe result."""
    from medlens.config import ExplainConfig
    from medlens.engine.planner import Planner
    from medlens.engine.probe import ProbeResult

    p = Planner(fp, budget, seed=0, started=0.0, clock=lambda: 20.0,
                explain=ExplainConfig(method="gradcam", score_images=8))
    p.plan_from_fingerprint()
    p.planned_at = 20.0
    r = ProbeResult(model="small_cnn", params={}, size=[28, 28], precision="32", batch_size=64, train_steps=5,
                    train_img_per_s=TRAIN_RATE, val_img_per_s=VAL_RATE, seconds=2.0, stopped_early=False)
    return p, r


def _need(k: int, n: dict, half: int) -> float:
    """By hand (docs/auto.md): k fold models at half their target epochs (3 s per fit besides its epochs, 0.4 s per
    epoch besides its images: no calibration was measured), plus evaluation (binary: 5 + 2 x 1 s), val+test
    predicted per member with 2 views (hflip TTA), the out-of-fold predictions of train+val and the explanation
    section (8 images x 240 inferences per member)."""
    pooled = n["train"] + n["val"]
    fold_epoch = (pooled - pooled / k) / TRAIN_RATE + (pooled / k) / VAL_RATE + 0.4
    post = 5 + 2 + 2 * k * 2 * (n["val"] + n["test"]) / VAL_RATE + 2 * pooled / VAL_RATE + 240 * 8 * k / VAL_RATE
    return k * (3 + half * fold_epoch) / SAFETY + post


def test_planner_cross_validates_small_data_by_the_budget_arithmetic():
    fp = _fp()
    p, r = _planner(fp, 900)
    assert p.determine_validation(r, load=5.0) == 5
    by = {d.setting: d for d in p.decisions}
    reason = by["train.cv_folds"].reason
    assert "1200 < 10000" in reason and "by image" in reason and "test split (400) is never part" in reason
    epochs = p.determine_epochs(r, 5.0, "15m")
    assert p.determine_ensemble(r, 5.0) == 5 == p.members
    half = math.ceil(p.target_epochs / 2)
    assert half <= epochs <= MAX_EPOCH_FACTOR * p.target_epochs
    assert p.estimates(r, 5.0)["total_s"] <= 900
    p.determine_threshold()
    assert "out-of-fold predictions of all 1200" in p.decisions[-1].reason

    # patients named in the data: the folds are dealt by patient
    p, r = _planner(_fp(patient_ids=True), 900)
    p.determine_validation(r, 5.0)
    assert "by patient" in p.decisions[-1].reason

    # a budget where 3 folds fit and 4 do not (the margin of a budget B: 10 s start-up + a reserve of 3% of B)
    half = math.ceil(p.target_epochs / 2)
    need3, need4 = _need(3, fp.n, half), _need(4, fp.n, half)
    assert need3 < need4
    budget = (need3 + 1 + 20 + 1.2 * 5 + 10) / (1 - RESERVE)
    p, r = _planner(fp, budget)
    assert p.determine_validation(r, 5.0) == 3
    assert "five do not fit" in p.decisions[-1].reason
    # and one where not even 3 fit: the holdout split is kept, and the reason says why
    p, r = _planner(fp, (need3 - 5 + 20 + 1.2 * 5 + 10) / (1 - RESERVE))
    assert p.determine_validation(r, 5.0) == 0
    assert "the holdout validation split of 200 is kept" in p.decisions[-1].reason


def test_planner_keeps_the_holdout_split_on_large_data():
    fp = _fp(n={"train": 9000, "val": 1000, "test": 2000})
    p, r = _planner(fp, 3600)
    assert p.determine_validation(r, 5.0) == 0
    reason = p.decisions[-1].reason
    assert "10000 >= 10000" in reason and "holdout validation split of 1000" in reason
    p.determine_threshold()
    assert "the validation split (1000 images)" in p.decisions[-1].reason


def test_binary_imbalance_keeps_the_plain_loss_and_multiclass_past_10_weights():
    from medlens.workflow.plan import base_decisions

    base, decisions = base_decisions(_fp(imbalance_ratio=9.0, class_counts={"train": [100, 900]}))
    assert base["train"]["imbalance"] == "none"
    assert "0.5 cut" in {d.setting: d for d in decisions}["train.imbalance"].reason
    base, _ = base_decisions(_fp(task="multiclass", n_classes=3, class_names=list("abc"), imbalance_ratio=12.0,
                                 class_counts={"train": [24, 276, 700]}))
    assert base["train"]["imbalance"] == "weighted_loss"


# ------------------------------------------------------------------ a cross-validated run
def _npz(tmp_path: Path, n=(60, 30, 30)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s, k in zip(("train", "val", "test"), n):
        y = (np.arange(k) % 3 == 0).astype(np.uint8)[:, None]
        x = rng.integers(0, 90, (k, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 6:16] += 100       # an off-centre square: the flip matters to the network
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    path = tmp_path / "cv.npz"
    np.savez(path, **arrays)
    return path


class _TestReads:
    """Counts reads of the test split's images (ArrayDataset.batch / __getitem__ on a dataset named */test),
    apart for the time inside ``fit_cv`` (fitting and predicting the folds) and the rest of the run."""

    def __init__(self, monkeypatch):
        from medlens.data.base import ArrayDataset
        from medlens.workflow import classifier

        self.during, self.after, self.in_cv = 0, 0, False
        batch, item, fit_cv = ArrayDataset.batch, ArrayDataset.__getitem__, classifier.fit_cv

        def count(ds):
            if ds.name.endswith("/test"):
                if self.in_cv:
                    self.during += 1
                else:
                    self.after += 1

        def counted_batch(ds, idx):
            count(ds)
            return batch(ds, idx)

        def counted_item(ds, i):
            count(ds)
            return item(ds, i)

        def spied_fit_cv(*a, **k):
            self.in_cv = True
            try:
                return fit_cv(*a, **k)
            finally:
                self.in_cv = False

        monkeypatch.setattr(ArrayDataset, "batch", counted_batch)
        monkeypatch.setattr(ArrayDataset, "__getitem__", counted_item)
        monkeypatch.setattr(classifier, "fit_cv", spied_fit_cv)


def _youden_by_hand(y: np.ndarray, p: np.ndarray) -> float:
    best = -1.0
    for t in np.unique(p):
        best = max(best, float(np.mean(p[y == 1] >= t) - np.mean(p[y == 0] >= t)))
    return best


def test_cv_run_threshold_from_out_of_fold_predictions_and_test_unread(tmp_path, monkeypatch):
    from medlens.config import config_from_dict
    from medlens.run import Run
    from medlens.workflow.train import train

    npz = _npz(tmp_path)
    reads = _TestReads(monkeypatch)
    cfg = config_from_dict({
        "name": "cv", "seed": 2, "output_dir": str(tmp_path),
        "data": {"source": "medmnist", "path": str(npz)},
        "model": {"name": "small_cnn", "params": {"widths": [4, 8]}},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "precision": "32", "cv_folds": 3, "ensemble": 3,
                  "augment": {"hflip": 0.5}},
        "evaluation": {"bootstrap": 0, "calibration": "none", "tta": True},
        "explain": {"method": "saliency"}})
    run_dir = train(cfg, progress_bar=False, log=lambda s: None)
    assert reads.during == 0          # the folds never read the test split
    assert reads.after > 0            # (the counter does count: the final evaluation reads it)

    cv = json.loads((run_dir / "cv.json").read_text())
    fold_of = np.asarray(cv["fold_of"])
    assert cv["folds"] == 3 and cv["n"] == {"train": 60, "val": 30} and len(fold_of) == 90
    assert sorted(np.bincount(fold_of).tolist()) == sorted(cv["fold_sizes"]) and min(cv["fold_sizes"]) > 0
    meta = json.loads((run_dir / "run.json").read_text())
    assert [m["fold"] for m in meta["members"]] == [0, 1, 2]
    assert all(m["n_train"] + m["n_held_out"] == 90 for m in meta["members"])

    # the out-of-fold predictions by hand: each train+val case through the one fold model that held it out,
    # averaged over the identity and the horizontal flip
    run = Run.open(run_dir)
    net: Any = run.network
    members = net.net.members
    with np.load(npz) as z:
        x = np.concatenate([z["train_images"], z["val_images"]]).astype(np.float32)[:, None] / 255
        y = np.concatenate([z["train_labels"], z["val_labels"]]).ravel()
    xt = net.normalize(torch.from_numpy(x))
    with torch.no_grad():
        p_all = torch.stack([(torch.sigmoid(m(xt).reshape(-1)) + torch.sigmoid(m(xt.flip(-1)).reshape(-1))) / 2
                             for m in members]).numpy()
    oof = p_all[fold_of, np.arange(len(y))]
    threshold = meta["threshold"]["value"]
    j_run = float(np.mean(oof[y == 1] >= threshold) - np.mean(oof[y == 0] >= threshold))
    assert j_run == pytest.approx(_youden_by_hand(y, oof), abs=1e-9)


def test_planning_never_reads_the_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_CACHE", str(tmp_path / "cache"))
    npz = _npz(tmp_path)
    reads = _TestReads(monkeypatch)
    r = medlens("plan", npz, "--budget", "2m", "--out", tmp_path / "p.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert reads.during == 0 and reads.after == 0


# ------------------------------------------------------------------ the whole budget (item 3)
@pytest.mark.parametrize("budget", [300, 900, 1800])
def test_the_budget_is_filled_with_epochs_and_never_overrun(budget):
    for fp in (_fp(), _fp(n={"train": 12000, "val": 1500, "test": 2000})):   # cross-validated, then holdout
        p, r = _planner(fp, budget)
        folds = p.determine_validation(r, 5.0)
        epochs = p.determine_epochs(r, 5.0, f"{budget}s")
        k = p.determine_ensemble(r, 5.0)
        est = p.estimates(r, 5.0)
        # by hand: what fitting may take (the budget less planning, loading x1.2, the margin and k members'
        # evaluation), of which the planned fitting uses SAFETY, to within one epoch, unless capped at 3x target
        margin = 10 + RESERVE * budget
        fit_share = SAFETY * (budget - 20 - 1.2 * 5 - margin - est["post_s"])
        capped = epochs == MAX_EPOCH_FACTOR * p.target_epochs
        assert est["fit_s"] <= fit_share + 1e-6
        assert capped or est["fit_s"] > fit_share - k * est["epoch_s"], (folds, epochs, est)
        assert 0.90 * budget <= est["total_s"] + 10 <= 1.05 * budget   # planned time (with start-up): 90-105%
        assert (folds == 0) == (fp.n["train"] + fp.n["val"] >= 10000)
        if epochs > p.target_epochs:
            assert "more each" in p.decisions[-2].reason or "capped" in p.decisions[-2].reason
