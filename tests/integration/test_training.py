"""Training on real PneumoniaMNIST: run folder, determinism, resume, threshold hygiene."""

import json

import lightning.pytorch.callbacks as cb
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from medlens.config import load_config
from medlens.data import build_data
from medlens.data.base import SplitData
from medlens.engine.train import TrainingInterrupted, train
from medlens.errors import MedlensError
from medlens.evaluation.evaluate import evaluate_run
from medlens.evaluation.threshold import choose_threshold
from medlens.engine.predict import load_run_model, predict_dataset


def _test_metrics(run):
    return json.loads((run / "metrics.json").read_text())["test"]["metrics"]


def test_run_folder_contents(trained_run):
    for f in ("config.yaml", "run.json", "model.pt", "history.csv", "metrics.json", "predictions.csv",
              "report.html", "plots/roc.png", "plots/confusion_matrix.png", "plots/training_curves.png",
              "checkpoints/last.ckpt"):
        assert (trained_run / f).exists(), f
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["threshold"]["chosen_on"] == "val"
    for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        v = m["test"]["metrics"][k]
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    assert m["test"]["metrics"]["auc"]["value"] > 0.75  # learned something in 2 tiny epochs
    h = pd.read_csv(trained_run / "history.csv")
    assert list(h["epoch"]) == [0, 1] and {"train_loss", "val_auc", "val_loss"} <= set(h.columns)
    # the checkpoint is a plain weights-only state dict
    state = torch.load(trained_run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_same_seed_same_metrics(trained_run, tmp_path):
    again = train(tiny_config(tmp_path, "shared"), progress_bar=False)
    assert _test_metrics(again) == _test_metrics(trained_run)
    other = train(tiny_config(tmp_path, "seed1", seed=1), progress_bar=False)
    assert _test_metrics(other)["auc"]["value"] != _test_metrics(trained_run)["auc"]["value"]


class _Crash(cb.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated power cut")


def test_resume_after_interruption_matches_uninterrupted(trained_run, tmp_path):
    cfg = tiny_config(tmp_path, "shared")
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, callbacks=[_Crash()], progress_bar=False)
    run = tmp_path / "shared"
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "model.pt").exists()
    with pytest.raises(MedlensError, match="--resume"):
        train(cfg, progress_bar=False)
    resumed = train(cfg, resume=True, progress_bar=False)
    assert _test_metrics(resumed) == _test_metrics(trained_run)
    h = pd.read_csv(resumed / "history.csv")
    assert list(h["epoch"]) == [0, 1]


def test_threshold_never_touches_test_labels(trained_run):
    cfg = load_config(trained_run / "config.yaml")
    data = build_data(cfg.data, seed=cfg.seed)
    first = evaluate_run(trained_run, data=data)
    scrambled = data.test.subset(np.arange(len(data.test)))
    scrambled.labels = 1 - scrambled.labels  # invert every test label
    second = evaluate_run(trained_run, data=SplitData(data.train, data.val, scrambled))
    assert first["threshold"]["value"] == second["threshold"]["value"]
    net, _ = load_run_model(trained_run)
    assert first["threshold"]["value"] == choose_threshold(data.val.labels, predict_dataset(net, data.val), "youden")
    assert first["test"]["metrics"]["auc"]["value"] == pytest.approx(1 - second["test"]["metrics"]["auc"]["value"])


def test_imbalance_modes_and_retina_task(tmp_path, data_root):
    run = train(tiny_config(tmp_path, "retina", data={"source": "medmnist", "name": "retinamnist",
                                                       "max_samples": 200, "color": "rgb"},
                            train__imbalance="weighted_loss"), progress_bar=False)
    m = _test_metrics(run)
    assert {"auc", "accuracy", "qwk", "mae"} <= set(m)
    run2 = train(tiny_config(tmp_path, "und", train__imbalance="undersample"), progress_bar=False)
    assert (run2 / "model.pt").exists()


def test_3d_training(tmp_path, data_root):
    run = train(tiny_config(tmp_path, "adrenal", data={"source": "medmnist", "name": "adrenalmnist3d",
                                                        "max_samples": 120},
                            model={"name": "fast_cnn3d", "params": {"widths": [4, 8, 8, 16]}}), progress_bar=False)
    meta = json.loads((run / "run.json").read_text())
    assert meta["spatial_dims"] == 3 and meta["input_size"] == [28, 28, 28]
