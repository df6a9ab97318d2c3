"""Training on real PneumoniaMNIST: run folder, determinism, resume, threshold hygiene."""

import json
import shutil

import lightning.pytorch.callbacks as cb
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from medlens.config import load_config
from medlens.data.base import SplitData
from medlens.errors import MedlensError
from medlens.evaluation.evaluate import evaluate_run
from medlens.evaluation.threshold import choose_threshold
from medlens.run import Predictor, Run
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.train import train
from servehelp import tiny_run


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


def test_threshold_never_touches_test_labels(trained_run, tmp_path):
    trained_run = shutil.copytree(trained_run, tmp_path / "run")  # evaluate_run rewrites metrics.json
    cfg = load_config(trained_run / "config.yaml")
    data = prepared_data(cfg.data, seed=cfg.seed)
    first = evaluate_run(trained_run, data=data)
    scrambled = data.test.subset(np.arange(len(data.test)))
    scrambled.labels = 1 - scrambled.labels  # invert every test label
    second = evaluate_run(trained_run, data=SplitData(data.train, data.val, scrambled))
    assert first["threshold"]["value"] == second["threshold"]["value"]
    run = Run.open(trained_run)
    p_val = Predictor(run).predict_dataset(data.val)
    assert run.threshold.value == first["threshold"]["value"] == choose_threshold(data.val.labels, p_val, "youden")
    assert run.threshold.chosen_on == "val" and run.threshold.rule == "youden"
    assert first["test"]["metrics"]["auc"]["value"] == pytest.approx(1 - second["test"]["metrics"]["auc"]["value"])


class _SeenBatches(cb.Callback):
    """What training really used: the labels of every training batch (per epoch) and, on the first
    batch, the module's loss on it next to its logits."""

    def __init__(self) -> None:
        self.labels: dict[int, list[np.ndarray]] = {}
        self.first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.labels.setdefault(trainer.current_epoch, []).append(y.numpy().reshape(-1).copy())
        if self.first is None:
            with torch.no_grad():
                logits = pl_module(x).float()
                self.first = (logits, y, float(pl_module.loss(logits, y)))

    def epoch_labels(self, epoch: int) -> np.ndarray:
        return np.concatenate(self.labels[epoch])


def test_weighted_loss_uses_inverse_frequency_class_weights(tmp_path, data_root):
    seen = _SeenBatches()
    run = train(tiny_config(tmp_path, "retina", data={"source": "medmnist", "name": "retinamnist",
                                                       "max_samples": 200, "color": "rgb"},
                            train__imbalance="weighted_loss"), callbacks=[seen], progress_bar=False)
    m = _test_metrics(run)
    assert {"auc", "accuracy", "qwk", "mae"} <= set(m)
    labels = seen.epoch_labels(0)  # shuffled, not resampled: every training image once
    assert len(labels) == 200
    counts = np.bincount(labels, minlength=5).astype(float)
    assert counts.min() < counts.max() / 2  # RetinaMNIST is imbalanced, so weights matter
    expected = torch.tensor(len(labels) / (5 * np.maximum(counts, 1)), dtype=torch.float32)
    logits, y, used = seen.first
    weighted = F.cross_entropy(logits, y.long(), weight=expected)
    assert used == pytest.approx(float(weighted), rel=1e-5)
    assert used != pytest.approx(float(F.cross_entropy(logits, y.long())), rel=1e-3)


def test_undersampling_balances_every_epoch(tmp_path, data_root):
    seen = _SeenBatches()
    train(tiny_config(tmp_path, "und", train__imbalance="undersample"), callbacks=[seen], progress_bar=False)
    for epoch in (0, 1):
        labels = seen.epoch_labels(epoch)
        n_normal, n_pneumonia = np.bincount(labels, minlength=2)
        # PneumoniaMNIST: "normal" (0) is the minority; ratio 1 keeps all of them and as many pneumonia cases
        assert n_normal == n_pneumonia and n_normal < 150, (epoch, n_normal, n_pneumonia)
    first, second = seen.epoch_labels(0), seen.epoch_labels(1)
    assert len(first) == len(second) < 300  # fewer than the 300 training images: undersampled


def test_balanced_sampler_draws_classes_equally(tmp_path, data_root):
    seen = _SeenBatches()
    train(tiny_config(tmp_path, "bal", train__imbalance="balanced_sampler"), callbacks=[seen], progress_bar=False)
    labels = np.concatenate([seen.epoch_labels(0), seen.epoch_labels(1)])
    assert len(labels) == 600  # 300 draws with replacement per epoch
    frac = float((labels == 0).mean())
    assert 0.42 < frac < 0.58, frac  # 50 % +- 4 standard errors; the data themselves hold about 26 % normal


def test_3d_training(tmp_path_factory, data_root):
    # the serve and export tests' AdrenalMNIST3D run (trained once per pytest process): a real 3D training
    run = tiny_run("a3d", tmp_path_factory)
    meta = json.loads((run / "run.json").read_text())
    assert meta["preprocessing"]["spatial_dims"] == 3 and meta["input_size"] == [28, 28, 28]


def test_trainer_keeps_deterministic_algorithms_on(tmp_path, data_root):
    """seed_everything asks torch for deterministic kernels; the Trainer must not switch them off again."""
    torch.use_deterministic_algorithms(False)
    train(tiny_config(tmp_path, "det", train__epochs=1), progress_bar=False)
    assert torch.are_deterministic_algorithms_enabled()
