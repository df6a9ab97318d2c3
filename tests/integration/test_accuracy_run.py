"""Issue 17: the accuracy tools together in real runs on PneumoniaMNIST (a few hundred images, tiny CNNs).

A 2-member ensemble with EMA, mixup + cutmix, progressive resizing and flip TTA: the run is one ensemble network
whose probability is the mean of its members' (each loaded from its own folder) averaged over the training
flips; the same config and seed give the same metrics; a time limit stops fitting and says so.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from conftest import tiny_config
from medlens.engine.module import outputs_to_probs
from medlens.engine.train import build_network
from medlens.run import Predictor, Run
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.train import train

TOOLS = dict(train__ensemble=2, train__ema=0.98, train__mixup=0.2, train__cutmix=1.0,
             train__progressive={"start": 0.5, "fraction": 0.5}, train__epochs=3,
             evaluation={"bootstrap": 50, "tta": True})


def _metrics(run) -> dict:
    m = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    return {k: v["value"] for k, v in m.items() if isinstance(v, dict)}


def test_ensemble_with_every_tool_is_one_network_of_its_members(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "tools", **TOOLS)
    path = train(cfg, progress_bar=False)
    meta = json.loads((path / "run.json").read_text())
    assert meta["model"] == "ensemble" and meta["model_params"]["k"] == 2
    assert [m["seed"] for m in meta["members"]] == [0, 1]
    assert all(m["epochs_run"] == 3 for m in meta["members"])
    hist = pd.read_csv(path / "history.csv")
    assert sorted(hist["member"].unique().tolist()) == [0, 1] and len(hist) == 6

    run = Run.open(path)
    data = prepared_data(cfg.data, seed=cfg.seed)
    x = data.test.batch(np.arange(40))[0]
    tta = Predictor(run).predict_arrays(x, calibrated=False)
    plain = Predictor(run, tta=False).predict_arrays(x, calibrated=False)
    assert not np.allclose(tta, plain, atol=1e-4)       # TTA changes the answer...
    flipped = Predictor(run, tta=False).predict_arrays(x.flip(-1), calibrated=False)
    assert np.allclose(tta, (plain + flipped) / 2, atol=1e-5)  # ...to the mean over the training flip (hflip)

    # the ensemble's probability is the mean of its members', each read from its own weights file
    member_probs = []
    for i in range(2):
        net = build_network("small_cnn", 1, 1, 2, [28, 28], {"widths": [8, 16, 32]}, [0.0], [1.0])
        net.load_state_dict(torch.load(path / "members" / str(i) / "model.pt", weights_only=True))
        with torch.no_grad():
            member_probs.append(outputs_to_probs("binary", net.eval()(x)).numpy())
    assert not np.allclose(member_probs[0], member_probs[1], atol=1e-3)
    assert np.allclose(plain, np.mean(member_probs, axis=0), atol=1e-5)

    # same config and seed: same metrics
    again = train(tiny_config(tmp_path / "again", "tools", **TOOLS), progress_bar=False)
    assert _metrics(again) == _metrics(path)


def test_a_time_limit_stops_fitting_keeps_the_best_and_says_so(tmp_path, data_root):
    cfg = tiny_config(tmp_path, "limited", train__epochs=200, train__max_minutes=0.15)
    path = train(cfg, progress_bar=False)
    meta = json.loads((path / "run.json").read_text())
    assert meta["time_limited"] is True
    assert 1 <= meta["epochs_run"] < 200
    assert meta["train_seconds"] < 60
    assert (path / "metrics.json").exists() and (path / "model.pt").exists()
