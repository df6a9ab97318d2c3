"""Architecture by measurement (issue 30, item 2) and the whole budget (item 3).

- the model choice follows the measured figures: synthetic probe and signal results are fed to the planner and its
  choice is checked against a hand computation of the rule in docs/auto.md (epochs each candidate could train,
  the half-target floor, the signal AUC and its tie margin); its reason names the figures;
- the signal run itself: seeded (the same AUC twice), on train+val only (the test split is sealed), and it learns
  (a separable task scores far above chance);
- the budget's arithmetic at 5, 15 and 30 minutes, by hand: the planned total is >= 90% and <= 105% of the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest
import torch

from plan_fixtures import explain_by_hand
from plan_fixtures import fingerprint as _fp


def _planner(fp, budget: float):
    from medlens.engine.planner import Planner

    p = Planner(fp, budget, seed=0, started=0.0, clock=lambda: 20.0)   # 20 s of planning so far
    p.plan_from_fingerprint()
    p.planned_at = 20.0
    return p


def _probe(model: str, train: float, val: float, epoch_seconds: float | None = None, ran: tuple[int, int] = (0, 0),
           fixed: float | None = None):
    """A probe result; with ``epoch_seconds`` a calibration: a steady epoch on ``ran`` (train, validation) cases,
    ``fixed`` seconds per fit besides its epochs."""
    from medlens.engine.probe import ProbeResult

    return ProbeResult(model=model, params={}, size=[28, 28], precision="32", batch_size=64, train_steps=5,
                       train_img_per_s=train, val_img_per_s=val, seconds=2.0, stopped_early=False,
                       full_epoch=epoch_seconds is not None, epoch_seconds=epoch_seconds, fixed_seconds=fixed,
                       epoch_train_n=ran[0], epoch_val_n=ran[1])


def _signal(model: str, auc: float, steps: int = 300):
    from medlens.engine.probe import SignalResult

    return SignalResult(model=model, params={}, steps=steps, folds=5, n_train=960, n_held=240, auc=auc, seconds=9.0)


# speeds of the four candidates (img/s training, inference)
RATES = {"small_cnn 32/64/128": (2000.0, 8000.0), "small_cnn 64/128/256": (800.0, 3000.0),
         "resnet18": (20.0, 100.0), "vit": (600.0, 2500.0)}
BUDGET, LOAD = 900.0, 5.0


def _epochs_by_hand(train: float, val: float) -> int:
    """docs/auto.md: one member, all the fitting share at the probed speed. Binary, radiograph-like (hflip: two
    TTA views), n = 1000/200/400, 20 s planned, loading 5 s x 1.2, start-up 10 s, reserve 2%, SAFETY 0.98;
    evaluation 5 s + 1 s per class + val and test predicted in two views + the explanation section; 0.4 s per
    epoch besides the images and 3 s per fit besides its epochs (no calibration was measured)."""
    available = BUDGET - 20 - 1.2 * LOAD - (10 + 0.02 * BUDGET)
    post = 5 + 1 * 2 + 2 * 1 * 2 * (200 + 400) / val + explain_by_hand(1, val, BUDGET)
    epoch = 1000 / train + 200 / val + 0.4
    return int((0.98 * (available - post) - 3) / epoch)


def test_model_candidates_by_fingerprint():
    p = _planner(_fp(), BUDGET)
    assert [c[0] for c in p.model_candidates()] == list(RATES)
    assert [c[1] for c in p.model_candidates()] == ["small_cnn", "small_cnn", "resnet18", "vit"]
    assert "vit" not in [c[0] for c in _planner(_fp(image_shape=[30, 30]), BUDGET).model_candidates()]
    assert _planner(_fp(spatial_dims=3, image_shape=[28, 28, 28]), BUDGET).model_candidates() == []


def test_resnet18_has_the_medmnist_stem_at_28_px():
    import torch.nn as nn

    from medlens.models.registry import create_model

    net = create_model("resnet18", 1, 2, 2, (28, 28))
    conv1 = cast(nn.Conv2d, getattr(net, "conv1"))
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    shapes = []      # no max-pool: the first residual stage sees the full 28 x 28 grid
    cast(nn.Module, getattr(net, "layer1")).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    assert shapes == [(1, 64, 28, 28)]


def test_model_choice_follows_the_measured_figures():
    p = _planner(_fp(), BUDGET)
    cands = p.model_candidates()
    probes = {label: _probe(model, *RATES[label]) for label, model, _ in cands}
    epochs = {label: _epochs_by_hand(*RATES[label]) for label in RATES}
    half = math.ceil(p.target_epochs / 2)
    assert p.target_epochs == math.ceil(1200 * 32 / 1000)      # batch 32 (1000/16 -> 32)
    assert epochs["resnet18"] < half <= min(epochs[k] for k in RATES if k != "resnet18")   # too slow for this budget
    assert all(p.candidate_epochs(probes[k], LOAD) == epochs[k] for k in RATES)

    # the signal runs: an equal share of 10% of the budget (30 s each for the three fast ones), as steps of 64
    steps = p.signal_steps(cands, probes, LOAD)
    assert steps == {"small_cnn 32/64/128": int(30 * 2000 / 64), "small_cnn 64/128/256": int(30 * 800 / 64),
                     "resnet18": 0, "vit": int(30 * 600 / 64)}

    # vit best (0.952); the wide CNN within 0.01 of it (0.946) and faster (more epochs) -> the wide CNN;
    # the narrow CNN (0.940) is outside the margin; resnet18 scores highest but cannot train half its target
    signals = {"small_cnn 32/64/128": _signal("small_cnn", 0.940), "small_cnn 64/128/256": _signal("small_cnn", 0.946),
               "vit": _signal("vit", 0.952), "resnet18": _signal("resnet18", 0.990)}
    assert epochs["small_cnn 64/128/256"] > epochs["vit"]
    chosen = p.choose_model(cands, probes, signals, LOAD)
    assert chosen == {"name": "small_cnn", "params": {"widths": [64, 128, 256], "dropout": 0.3}}
    assert p.model == "small_cnn" and p.params["widths"] == [64, 128, 256]
    (d,) = [d for d in p.decisions if d.setting == "model"]         # replaced in place, not added
    reason = d.reason
    for label in RATES:                                             # every candidate's figures
        train = RATES[label][0]
        assert f"{label} {train:.0f} img/s" in reason and f"{epochs[label]} epochs in the budget" in reason
    assert "signal AUC 0.946" in reason and "signal AUC 0.952" in reason and "within 0.01 of the best 0.952" in reason

    # a clearly better signal wins over speed
    p = _planner(_fp(), BUDGET)
    p.choose_model(cands, probes, {**signals, "vit": _signal("vit", 0.960)}, LOAD)
    assert p.model == "vit" and p.params == {"patch_size": 4}
    assert "signal AUC 0.960, the best" in [d for d in p.decisions if d.setting == "model"][0].reason

    # no signal: the rule's model stays, and the reason says why
    p = _planner(_fp(), BUDGET)
    p.choose_model(cands, probes, {}, LOAD)
    assert p.model == "small_cnn" and p.params["widths"] == [32, 64, 128]
    assert "not chosen by measurement: no candidate" in [d for d in p.decisions if d.setting == "model"][0].reason


def _tiny(tmp_path, n=(80, 40, 40)):
    from medlens.data.medmnist import load_medmnist

    rng = np.random.default_rng(0)
    arrays = {}
    for s, k in zip(("train", "val", "test"), n):
        y = (np.arange(k) % 2).astype(np.uint8)[:, None]
        x = rng.integers(0, 80, (k, 28, 28)).astype(np.uint8)
        x[y[:, 0] == 1, 8:20, 8:20] += 120       # a bright square: separable
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    np.savez(tmp_path / "tiny.npz", **arrays)
    return load_medmnist(None, path=tmp_path / "tiny.npz")


def test_signal_run_is_seeded_learns_and_never_reads_the_test_split(tmp_path):
    from medlens.config import TrainConfig
    from medlens.data.splits import Sealed
    from medlens.engine.probe import signal

    data = _tiny(tmp_path)
    data = replace(data, test=cast(Any, Sealed(data.test, "the signal run")))   # any read of it raises
    tc = TrainConfig.model_validate({"epochs": 2, "batch_size": 16, "lr": 0.01, "precision": "32",
                                     "augment": {"hflip": 0.5}})
    params = {"widths": [4, 8]}
    a = signal(tc, data, "small_cnn", params, steps=24, folds=5, max_held=20, seed=3)
    b = signal(tc, data, "small_cnn", params, steps=24, folds=5, max_held=20, seed=3)
    assert a.steps == 24 and a.folds == 5 and a.n_held == 20 and a.n_train == 96   # 4 of 5 folds of 120
    assert a.auc == b.auc                                                          # seeded
    assert a.auc > 0.8                                                             # the square is learnt


@pytest.mark.parametrize("budget", [300, 900, 1800])
@pytest.mark.parametrize("n", [{"train": 4708, "val": 524, "test": 624}, {"train": 1080, "val": 120, "test": 400},
                               {"train": 12000, "val": 1500, "test": 2000}])
def test_whole_budget_by_hand(budget, n):
    """The planned total of train --auto (start-up, planning, loading x1.2, fitting, evaluation), computed here
    from the planner's decisions and the measured figures, is 90-105% of the budget."""
    fp = _fp(n=n, class_counts={"train": [n["train"] // 4, n["train"] - n["train"] // 4],
                                "val": [n["val"] // 4, n["val"] - n["val"] // 4], "test": [100, n["test"] - 100]})
    p = _planner(fp, budget)
    t, v = 1500.0, 6000.0
    # a calibration on fold 0 of five (960 / 240 of 1200 pooled cases): 10% slower than its per-image rates (its
    # overheads), 1.5 s per fit besides the epochs
    pooled = n["train"] + n["val"]
    ran = (pooled - pooled // 5, pooled // 5)
    r = _probe("small_cnn", t, v, epoch_seconds=1.1 * (ran[0] / t + ran[1] / v), ran=ran, fixed=1.5)
    folds = p.determine_validation(r, LOAD)
    epochs = p.determine_epochs(r, LOAD, f"{budget}s")
    k = p.determine_ensemble(r, LOAD)
    p.determine_max_minutes(r, LOAD)
    # the calibration's epoch scaled by the per-image rates: a fold model trains on (k-1)/k of train+val and
    # validates on the rest
    if folds:
        epoch = 1.1 * ((pooled - pooled / folds) / t + pooled / folds / v)
        oof = 2 * pooled / v
    else:
        epoch = 1.1 * (n["train"] / t + n["val"] / v)
        oof = 0.0
    post = 5 + 2 + 2 * k * 2 * (n["val"] + n["test"]) / v + oof + explain_by_hand(k, v, budget)
    total = 10 + 20 + 1.2 * LOAD + k * (1.5 + epochs * epoch) + post
    assert 0.90 * budget <= total <= 1.05 * budget, (folds, k, epochs, total / budget)
    assert total == pytest.approx(p.planned_total(r, LOAD), abs=0.2)
    # train.max_minutes cuts fitting only where the run would overrun its budget by 5%
    cap = [d for d in p.decisions if d.setting == "train.max_minutes"][0]
    assert cap.value * 60 == pytest.approx(1.05 * budget - 10 - 20 - 1.2 * LOAD - post, abs=1)
    assert f"{total / budget:.0%} of the budget" in cap.reason


def test_a_chosen_vit_gets_no_progressive_resizing():
    p = _planner(_fp(image_shape=[64, 64], resolutions_on_disk=[64], resolution_files={64: "x.npz"}), BUDGET)
    p.image_size, p.epochs = 64, 40
    assert p.determine_progressive() is not None          # the small CNN takes the smaller early inputs
    p.model, p.params = "vit", {"patch_size": 4}
    assert p.determine_progressive() is None and "fix its input size" in p.decisions[-1].reason


def test_explanations_are_given_their_share_of_the_budget():
    """The report's explanation section is part of the evaluation estimate; where the configured image counts
    would take more than 5% of the budget (a 5-member ensemble at a 3D network's 358 img/s: ~241 s of 30 minutes)
    both counts are scaled down, and the estimate counts what remains."""
    p = _planner(_fp(), 1800)
    slow = _probe("small_cnn", 100.0, 358.0)
    p.members = 5
    full = 240 * (8 * 5 + 32) * 5 / 358
    assert full > 0.05 * 1800
    f = 0.05 * 1800 / full
    want = {"select_images": max(2, int(8 * f)), "score_images": max(8, int(32 * f))}
    assert want == {"select_images": 2, "score_images": 11}
    assert p.determine_explanations(slow) == want
    assert "more than 5% of the budget" in p.decisions[-1].reason and f"~{full:.0f}s" in p.decisions[-1].reason
    assert p.explain_seconds(slow, 5) == pytest.approx(240 * (2 * 5 + 11) * 5 / 358)
    assert p.post_seconds(slow, 5, 0) == pytest.approx(5 + 2 + 2 * 5 * 2 * 600 / 358 + 240 * 21 * 5 / 358)
    # a fast 2D ensemble keeps the configured counts
    p.decisions.clear()
    assert p.determine_explanations(_probe("small_cnn", 2000.0, 6000.0)) == {"select_images": 8, "score_images": 32}
    assert "fewer than" not in p.decisions[-1].reason
