"""``train.ensemble``: k members fitted one after another with seeds ``seed .. seed+k-1``, each in
``members/<i>/`` (its own checkpoints, history, weights and ``member.json``; a finished member is kept on
``--resume``), sharing the time limit, then put behind one soft-voting module (``models.ensemble.SoftVote``).
The ensemble's weights and history are written through the run life-cycle's atomic writers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from medlens.engine.distributed import plan
from medlens.engine.module import ClassifierNet
from medlens.engine.train import FitResult, fit_classifier
from medlens.errors import ConfigError
from medlens.models.ensemble import SoftVote
from medlens.tasks import get_task
from medlens.workflow.lifecycle import save_weights, write_record, write_table


def fit_ensemble(cfg, data, network, path: Path, resume: bool, callbacks, progress_bar: bool,
                 limit: float | None, log):
    """Fit the members (each gets an equal share of what is left of ``limit`` seconds); returns the soft-voting
    model, a ``FitResult`` over the members and the members' records."""
    if plan(cfg.train).distributed:
        raise ConfigError("train.ensemble trains its members one after another in one process; use "
                          "train.devices: 1 with it")
    k, t0 = cfg.train.ensemble, time.time()
    nets, members, histories = [], [], []
    for i in range(k):
        mdir = path / "members" / str(i)
        mdir.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model_copy(update={"seed": cfg.seed + i})
        done = mdir / "member.json"
        net = network(mcfg.seed)
        if resume and done.exists() and (mdir / "model.pt").exists():
            net.load_state_dict(torch.load(mdir / "model.pt", map_location="cpu", weights_only=True))
            info = json.loads(done.read_text(encoding="utf-8"))
            log(f"ensemble member {i + 1}/{k} (seed {mcfg.seed}) already trained")
        else:
            share = None if limit is None else max(1.0, (limit - (time.time() - t0)) / (k - i))
            log(f"ensemble member {i + 1}/{k} (seed {mcfg.seed})"
                + (f", up to {share / 60:.1f} min" if share else ""))
            net, fit = fit_classifier(mcfg, data, net, mdir, resume and (mdir / "checkpoints" / "last.ckpt").exists(),
                                      callbacks, progress_bar, share)
            info = {"member": i, "seed": mcfg.seed, "epochs_run": fit.epochs_run,
                    "best_epoch_metric": {fit.monitor: fit.best_score}, "train_seconds": round(fit.seconds, 1),
                    "time_limited": fit.time_limited}
            write_record(done, info)
        nets.append(net)
        members.append(info)
        if (mdir / "history.csv").exists():
            histories.append(pd.read_csv(mdir / "history.csv").assign(member=i))
    task = get_task(data.task)     # softmax over exclusive classes with one output each, else sigmoid
    combine = "softmax" if task.exclusive and not task.one_score(len(data.class_names)) else "sigmoid"
    # one normalisation in front: every member was fitted with the training split's statistics
    model = ClassifierNet(SoftVote([n.net for n in nets], combine), nets[0].normalize.mean,
                          nets[0].normalize.std).eval()
    save_weights(path, model)
    if histories:
        write_table(path / "history.csv", pd.concat(histories, ignore_index=True))
    scores = [v for m in members for v in m["best_epoch_metric"].values() if v is not None]
    fit = FitResult(max(scores) if scores else None, max(m["epochs_run"] for m in members), cfg.train.monitor,
                    time.time() - t0, time_limited=any(m["time_limited"] for m in members))
    return model, fit, members
