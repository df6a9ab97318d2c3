"""Fitting: a model and its data in, a trained network (and its checkpoints) out.

The engine trains and returns. It writes only what fitting itself needs into the folder it is given
(``checkpoints/`` for resume, ``history.csv``, the weights); the run contract (``run.json``),
evaluation, explanations and the report are the workflow's (``medlens.workflow.train``).
"""

from __future__ import annotations

import os
import platform
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from medlens.data.segmentation import PatchSampler
from medlens.engine.classical import dataset_features, fit_classical, save_model
from medlens.engine.distributed import FORK_SERVER, global_rank, plan, trainer_arguments
from medlens.engine.module import ClassifierModule, monitor_mode, progressive_size
from medlens.engine.network import ClassifierNet
from medlens.engine.sampling import make_loader
from medlens.engine.segmentation import SegmentationModule, WholeImages
from medlens.errors import ConfigError, MedlensError
from medlens.models import create_model
from medlens.tasks import Task, get_task
from medlens.utils import atomic_path

IMBALANCE_MODES = {"none": "shuffle", "weighted_loss": "shuffle", "balanced_sampler": "balanced",
                   "undersample": "undersample"}


class TrainingInterrupted(MedlensError):
    """Training stopped before its last epoch; ``medlens train --resume`` continues it."""


@dataclass
class FitResult:
    best_score: float | None
    epochs_run: int
    monitor: str
    seconds: float
    distributed: dict | None = None   # the data-parallel layout (engine.distributed), when more than one process
    time_limited: bool = False        # stopped by the time limit (train.max_minutes) before its last epoch

    def summary(self) -> dict:
        env = environment() | ({"distributed": self.distributed} if self.distributed else {})
        return {"train_seconds": round(self.seconds, 1), "epochs_run": self.epochs_run,
                "best_epoch_metric": {self.monitor: self.best_score}, "environment": env,
                "time_limited": self.time_limited}


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def channel_stats(ds) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a dataset's images in the model's input scale."""
    idx = np.sort(np.random.default_rng(0).choice(len(ds), min(len(ds), 4096), replace=False))
    xs = ds.batch(idx)[0].numpy().astype(np.float64)  # the model's input scale, whatever the storage
    axes = (0,) + tuple(range(2, xs.ndim))
    return xs.mean(axis=axes).tolist(), xs.std(axis=axes).tolist()


def build_network(model: str, in_channels: int, n_outputs: int, spatial_dims: int, input_size, params: dict,
                  mean, std, target: list[float] | None = None) -> ClassifierNet:
    """An untrained network: the registered architecture behind per-channel normalisation (and, for a numeric
    target, its training ``[mean, std]`` applied to the output: ``RunMeta.target_scale``)."""
    net = create_model(model, in_channels, n_outputs, spatial_dims, tuple(input_size), **params)
    return ClassifierNet(net, mean, std, target)


def class_weights(counts: np.ndarray, task: str | Task, mode: str):
    """(class weights, positive weight) of the loss for ``train.imbalance: weighted_loss``, from the
    training split's class counts (the task's ``loss_weights``)."""
    if mode != "weighted_loss":
        return None, None
    return get_task(task).loss_weights(counts)


def fit_classifier(cfg, data, net: ClassifierNet, run: Path, resume: bool, callbacks=None,
                   progress_bar: bool = True, max_seconds: float | None = None) -> tuple[ClassifierNet, FitResult]:
    """Train a classifier on ``data.train`` monitoring ``data.val``; returns the best network (the EMA weights
    with ``train.ema``). ``max_seconds`` stops fitting at that wall time, keeping the best checkpoint."""
    t0 = time.time()
    monitor = cfg.train.monitor
    monitors = get_task(data.task).monitors
    if monitor not in monitors:
        raise ConfigError(f"train.monitor '{monitor}' is not one of {', '.join(monitors)}")
    tr = data.train
    if cfg.train.progressive is not None:
        _check_progressive(cfg, net, tr)
    # (the pyright ignores here and below: torch documents Module.to(memory_format=...), its overloads omit it)
    if cfg.train.channels_last and tr.spatial_dims == 2:
        net = net.to(memory_format=torch.channels_last)  # pyright: ignore[reportCallIssue]
    cw, pw = class_weights(tr.class_counts(), data.task, cfg.train.imbalance)
    module = ClassifierModule(net, data.task, cfg.train, seed=cfg.seed, class_weights=cw, pos_weight=pw)
    mode = IMBALANCE_MODES[cfg.train.imbalance]
    # data parallel: train.batch_size per process, each process its slice of the same (seed, epoch) order
    dist = plan(cfg.train)
    train_loader = make_loader(tr, cfg.train.batch_size, mode, cfg.seed, cfg.train.undersample_ratio,
                               num_replicas=dist.world_size)
    val_loader = make_loader(data.val, max(cfg.train.batch_size, 256), "sequential")
    best, epochs, limited = fit_module(cfg, module, train_loader, val_loader, run, monitor, resume, callbacks,
                                 progress_bar, max_seconds)
    net = save_best(module, run)
    return net.to(memory_format=torch.contiguous_format).eval(), FitResult(  # pyright: ignore[reportCallIssue]
        best, epochs, monitor, time.time() - t0, dist.summary() if dist.distributed else None, limited)


def _check_progressive(cfg, net: ClassifierNet, tr) -> None:
    """``train.progressive`` needs a network that takes smaller inputs (global pooling): refuse others now."""
    small = progressive_size(cfg.train, 0, tuple(tr.image_shape))
    if small is None:
        return
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, tr.in_channels, *small))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"train.progressive: model '{cfg.model.name}' does not take {small} inputs (it needs a "
                          f"fixed input size: {str(e).splitlines()[0][:120]}); use a model with global pooling "
                          "such as small_cnn or fast_cnn3d") from None
    finally:
        net.train()


def fit_segmentation(cfg, data, net: ClassifierNet, n_outputs: int, run: Path, resume: bool, callbacks=None,
                     progress_bar: bool = True) -> tuple[ClassifierNet, FitResult]:
    """U-Net training on sampled patches, validated on whole images (``val_dice``)."""
    t0 = time.time()
    seg = cfg.segmentation
    sampler = PatchSampler(data.train, seg.patch_size, seg.patches_per_epoch, seg.foreground_ratio, cfg.seed)
    module = SegmentationModule(net, cfg.train, seg, n_outputs, seed=cfg.seed, sampler=sampler)
    # PatchSampler is a map-style dataset (len, getitem) without torch's Dataset base class
    train_loader = DataLoader(cast(Dataset, sampler), batch_size=cfg.train.batch_size, shuffle=False, drop_last=False)
    val_loader = DataLoader(WholeImages(data.val), batch_size=1, shuffle=False)
    best, epochs, limited = fit_module(cfg, module, train_loader, val_loader, run, "val_dice", resume, callbacks,
                                 progress_bar)
    net = save_best(module, run)
    return net.eval(), FitResult(best, epochs, "val_dice", time.time() - t0, time_limited=limited)


def fit_module(cfg, module, train_loader, val_loader, run: Path, monitor: str, resume: bool,
         callbacks: list | None, progress_bar: bool, max_seconds: float | None = None) -> tuple[float | None, int, bool]:
    """Lightning fit with best/last checkpoints and history; returns (best monitored value, epochs run, whether
    the time limit ``max_seconds`` stopped it)."""
    dist = plan(cfg.train)
    if dist.distributed and not isinstance(module, ClassifierModule):
        raise ConfigError("train.devices x train.num_nodes > 1 is for classifier runs; segmentation trains in one "
                          "process")
    ckpt_dir = run / "checkpoints"
    mode_mm = monitor_mode(monitor)
    cbs = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode_mm, save_top_k=1,
                           save_last=True, enable_version_counter=False),
           HistoryWriter(run / "history.csv")]
    if cfg.train.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode_mm, patience=cfg.train.early_stopping_patience))
    if dist.distributed:  # the machine's threads shared between this node's processes
        cbs.append(_ThreadsPerProcess(max(1, (cfg.train.num_threads or os.cpu_count() or 1) // dist.devices)))
    if dist.launcher == FORK_SERVER:  # workers from the fork server: this process's state goes with them
        cbs.append(CallerState())
    trainer = L.Trainer(max_epochs=cfg.train.epochs, **trainer_arguments(dist),
                        max_time=timedelta(seconds=max(1.0, max_seconds)) if max_seconds else None,
                        precision=cfg.train.precision, callbacks=cbs + list(callbacks or []),
                        logger=False, enable_progress_bar=progress_bar, enable_model_summary=False,
                        deterministic="warn", num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_dir / "last.ckpt") if resume else None,
                weights_only=True)
    if dist.started_by_medlens:
        # the workers have joined; this process saw only their final state, the checkpoints hold the rest
        if trainer.interrupted:
            raise TrainingInterrupted(f"training stopped; resume with `medlens train {run / 'config.yaml'} "
                                      f"--resume`", run)
        return _spawned_result(ckpt_dir, monitor) + (False,)
    if trainer.interrupted or trainer.current_epoch < cfg.train.epochs and not trainer.should_stop:
        raise TrainingInterrupted(f"training stopped at epoch {trainer.current_epoch}; resume with "
                                  f"`medlens train {run / 'config.yaml'} --resume`", run)
    score = cbs[0].best_model_score
    limited = bool(max_seconds) and trainer.current_epoch < cfg.train.epochs and not any(
        c.stopped_epoch for c in trainer.early_stopping_callbacks)
    if score is None and limited:
        raise ConfigError(f"train.max_minutes: the time limit ({max_seconds:.0f} s) ran out before the first "
                          "validation; give more time or fewer samples")
    return (float(score) if score is not None else None), int(trainer.current_epoch), limited


def _spawned_result(ckpt_dir: Path, monitor: str) -> tuple[float | None, int]:
    """(best monitored value, epochs run) of spawned workers, read from their checkpoints."""
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    best = None
    for k, v in last.get("callbacks", {}).items():
        if k.startswith("ModelCheckpoint") and v.get("best_model_score") is not None:
            best = float(v["best_model_score"])
    return best, int(last["epoch"]) + 1


def save_best(module, run: Path):
    """Load the best checkpoint (else the last) into ``module``, write its weights as ``model.pt`` (global rank 0
    only: the other data-parallel processes write nothing) and return the network (its EMA with ``train.ema``)."""
    ckpt_dir = run / "checkpoints"
    best = ckpt_dir / "best.ckpt"
    state = torch.load(best if best.exists() else ckpt_dir / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    module.load_state_dict(state)
    net = module.final_network() if hasattr(module, "final_network") else module.model
    if global_rank() != 0:
        return net
    with atomic_path(run / "model.pt") as tmp:
        torch.save(net.to(memory_format=torch.contiguous_format).state_dict(), tmp)
    return net


def fit_classical_model(cfg, data, run: Path):
    """Features + random forest / SVM; writes ``model.skops`` and a one-row ``history.csv``."""
    t0 = time.time()
    X = dataset_features(data.train)
    model = fit_classical(cfg.model.name, X, data.train.labels, cfg.seed, cfg.model.params)
    save_model(model, run / "model.skops")
    with atomic_path(run / "history.csv") as tmp:
        pd.DataFrame([{"epoch": 0}]).to_csv(tmp, index=False)
    return model, int(X.shape[1]), FitResult(None, 1, "none", time.time() - t0)


def _history_row(trainer) -> dict:
    row: dict[str, float] = {"epoch": int(trainer.current_epoch)}
    for k, v in trainer.callback_metrics.items():
        row[k] = float(v)
    return row


class HistoryWriter(Callback):
    """Appends one row per epoch to ``history.csv`` (rewritten atomically; survives resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # data parallel: one writer
            return
        rows = pd.read_csv(self.path).to_dict("records") if self.path.exists() else []
        rows = [r for r in rows if r["epoch"] < trainer.current_epoch] + [_history_row(trainer)]
        with atomic_path(self.path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)


class CallerState(Callback):
    """What data-parallel workers from the fork server (``engine.distributed``) need of the process that
    starts them, set in each worker at ``setup`` (Lightning does both for ``spawn`` only):

    - the random states and torch's determinism flags, taken when the trainer is built: a forked worker
      inherits the server's, so its dropout and augmentation draws would not follow ``seed_everything``;
    - a worker's own copy of the network: the module reaches the workers pickled through shared memory, so
      without a copy every worker would step the same parameters (the two-process run drifted from the
      one-process run by 0.022 AUC, against < 0.01 with copies).
    """

    def __init__(self) -> None:
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()

    def setup(self, trainer, pl_module, stage) -> None:
        with torch.no_grad():
            for t in [*pl_module.parameters(), *pl_module.buffers()]:
                t.data = t.data.clone()
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)


class _ThreadsPerProcess(Callback):
    """Each data-parallel process uses its share of the node's threads."""

    def __init__(self, n: int) -> None:
        self.n = n

    def setup(self, trainer, pl_module, stage) -> None:
        torch.set_num_threads(self.n)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels.

    ``PYTHONHASHSEED`` is not set here: it only takes effect at interpreter start-up. Nothing in medlens
    depends on string-hash order (sets are sorted before use), which a test checks across hash seeds.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
