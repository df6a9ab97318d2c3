"""Ensembles of classifiers, put behind one soft-voting module (``models.ensemble.SoftVote``); each member is
fitted in ``members/<i>/`` (its own checkpoints, history, weights and ``member.json``; a finished member is kept
on ``--resume``), the members one after another, sharing the time limit. The ensemble's weights and history are
written through the run life-cycle's atomic writers.

- ``train.ensemble`` k (``fit_ensemble``): k members with seeds ``seed .. seed+k-1`` on the same training split.
- ``train.cv_folds`` k (``fit_cv``, issue 30): cross-validation inside the run. The training and validation
  splits are pooled and dealt into k folds by patient (``data.splits.cv_folds``); member i (seed ``seed+i``)
  trains on the other folds and keeps its best epoch on fold i; the k fold models are the ensemble. Each case of
  train+val is then predicted by the one fold model that did not train on it (the out-of-fold predictions, with
  the run's test-time flips), and the caller chooses calibration and threshold on those. The test split is
  sealed (``data.splits.Sealed``) while the folds are fitted and predicted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medlens.data.splits import Sealed, cv_splits
from medlens.engine.distributed import plan
from medlens.engine.module import ClassifierNet
from medlens.engine.train import FitResult, fit_classifier
from medlens.errors import ConfigError
from medlens.models.ensemble import SoftVote
from medlens.tasks import get_task
from medlens.transforms.augment import tta_flips
from medlens.workflow.lifecycle import save_weights, write_record, write_table

#: (labels, uncalibrated probabilities) of every train+val case, in the pooled order (train, then val)
OutOfFold = tuple[np.ndarray, np.ndarray]


def fit_ensemble(cfg, data, network, path: Path, resume: bool, callbacks, progress_bar: bool,
                 limit: float | None, log):
    """``train.ensemble``: fit the members (each gets an equal share of what is left of ``limit`` seconds);
    returns the soft-voting model, a ``FitResult`` over the members, the members' records and ``None`` (no
    out-of-fold predictions)."""
    model, fit, members, _ = _fit_members(cfg, [data] * cfg.train.ensemble, network, path, resume, callbacks,
                                          progress_bar, limit, log, "ensemble member")
    return model, fit, members, None


def fit_cv(cfg, data, network, path: Path, resume: bool, callbacks, progress_bar: bool, limit: float | None,
           log) -> tuple[ClassifierNet, FitResult, list[dict], OutOfFold]:
    """``train.cv_folds``: fit the k fold models; returns the soft-voting model of all k, a ``FitResult`` over
    them, their records and the out-of-fold predictions (``OutOfFold``). ``cv.json`` in ``path`` records which
    fold each pooled case belongs to (positions, no identifiers)."""
    k = cfg.train.cv_folds
    if k < 2:
        raise ConfigError(f"train.cv_folds {k}: cross-validation needs at least 2 folds (0 turns it off)")
    if cfg.train.ensemble not in (1, k):
        raise ConfigError(f"train.ensemble {cfg.train.ensemble} with train.cv_folds {k}: the {k} fold models are "
                          f"the ensemble; set train.ensemble to 1 or {k}")
    pool, folds, fold_data = cv_splits(data, k, cfg.seed, test=Sealed(data.test, "fitting the cross-validation folds"))
    by = "patient" if data.patients_known else "image"
    log(f"cross-validation: {len(pool)} train+val cases in {k} folds by {by} "
        f"({', '.join(str(len(f)) for f in folds)})")
    model, fit, members, nets = _fit_members(cfg, fold_data, network, path, resume, callbacks, progress_bar, limit,
                                             log, "fold model")
    flips = tta_flips(cfg.train.augment, pool.spatial_dims) if cfg.evaluation.tta else [()]
    task = get_task(data.task)
    oof: np.ndarray | None = None
    for f, net, fd in zip(folds, nets, fold_data):
        p = predict_probs(net, fd.val, task, flips)
        if oof is None:
            oof = np.zeros((len(pool), *p.shape[1:]), np.float64)
        oof[f] = p
    assert oof is not None
    fold_of = np.zeros(len(pool), np.int64)
    for i, f in enumerate(folds):
        fold_of[f] = i
    write_record(path / "cv.json", {"folds": k, "by": by, "n": {"train": len(data.train), "val": len(data.val)},
                                    "fold_sizes": [len(f) for f in folds], "fold_of": fold_of.tolist()})
    return model, fit, members, (pool.labels, oof)


@torch.no_grad()
def predict_probs(net, ds, task, flips, batch_size: int = 256) -> np.ndarray:
    """Uncalibrated probabilities of ``ds`` as ``run.Predictor`` computes them (the mean over ``flips``)."""
    net.eval()
    out = []
    for i in range(0, len(ds), batch_size):
        x = ds.batch(np.arange(i, min(i + batch_size, len(ds))))[0]
        out.append(torch.stack([task.activation(net(x.flip(f) if f else x)) for f in flips]).mean(0))
    return torch.cat(out).numpy().astype(np.float64)


def _fit_members(cfg, datas: list, network, path: Path, resume: bool, callbacks, progress_bar: bool,
                 limit: float | None, log, what: str):
    """Fit member i on ``datas[i]`` with seed ``seed+i`` in ``members/<i>/``; returns the soft-voting model, a
    ``FitResult`` over the members, their records and the fitted networks."""
    if plan(cfg.train).distributed:
        raise ConfigError("train.ensemble and train.cv_folds train their members one after another in one "
                          "process; use train.devices: 1 with them")
    k, t0 = len(datas), time.time()
    nets, members, histories = [], [], []
    for i, data in enumerate(datas):
        mdir = path / "members" / str(i)
        mdir.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model_copy(update={"seed": cfg.seed + i})
        done = mdir / "member.json"
        net = network(mcfg.seed)
        if resume and done.exists() and (mdir / "model.pt").exists():
            net.load_state_dict(torch.load(mdir / "model.pt", map_location="cpu", weights_only=True))
            info = json.loads(done.read_text(encoding="utf-8"))
            log(f"{what} {i + 1}/{k} (seed {mcfg.seed}) already trained")
        else:
            share = None if limit is None else max(1.0, (limit - (time.time() - t0)) / (k - i))
            log(f"{what} {i + 1}/{k} (seed {mcfg.seed})" + (f", up to {share / 60:.1f} min" if share else ""))
            net, fit = fit_classifier(mcfg, data, net, mdir, resume and (mdir / "checkpoints" / "last.ckpt").exists(),
                                      callbacks, progress_bar, share)
            info = {"member": i, "seed": mcfg.seed, "epochs_run": fit.epochs_run,
                    "best_epoch_metric": {fit.monitor: fit.best_score}, "train_seconds": round(fit.seconds, 1),
                    "time_limited": fit.time_limited}
            if cfg.train.cv_folds:
                info.update(fold=i, n_train=len(data.train), n_held_out=len(data.val))
            write_record(done, info)
        nets.append(net)
        members.append(info)
        if (mdir / "history.csv").exists():
            histories.append(pd.read_csv(mdir / "history.csv").assign(member=i))
    task = get_task(datas[0].task)     # softmax over exclusive classes with one output each, else sigmoid
    combine = "softmax" if task.exclusive and not task.one_score(len(datas[0].class_names)) else "sigmoid"
    # one normalisation in front: every member was fitted with the training split's statistics
    model = ClassifierNet(SoftVote([n.net for n in nets], combine), nets[0].normalize.mean,
                          nets[0].normalize.std).eval()
    save_weights(path, model)
    if histories:
        write_table(path / "history.csv", pd.concat(histories, ignore_index=True))
    scores = [v for m in members for v in m["best_epoch_metric"].values() if v is not None]
    fit = FitResult(max(scores) if scores else None, max(m["epochs_run"] for m in members), cfg.train.monitor,
                    time.time() - t0, time_limited=any(m["time_limited"] for m in members))
    return model, fit, members, nets
