"""Speed probes for the planner: a few real training steps of a candidate on real batches.

A probe builds the candidate network behind the run's normalisation, wraps it in the training module with the
planned augmentation, loss and precision, and runs Lightning on a handful of training batches and one
validation batch of the real data, timing each step. The first step (allocation, autocast warm-up) is dropped
when more than one was run. A probe stops early once it has spent ``max_seconds``, so an infeasible candidate
(a large 3D input on a CPU) costs seconds, not minutes, to rule out.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from medlens.engine.module import ClassifierModule
from medlens.engine.sampling import make_loader
from medlens.engine.train import build_network, channel_stats, class_weights


@dataclass
class ProbeResult:
    """Measured speed of one candidate."""

    model: str
    params: dict
    size: list[int]
    precision: str
    batch_size: int
    train_steps: int            # steps timed (the warm-up step excluded when there were several)
    train_img_per_s: float      # training throughput, augmentation and optimiser step included
    val_img_per_s: float        # inference throughput (validation batches)
    seconds: float              # wall time the probe itself cost
    stopped_early: bool
    full_epoch: bool = False    # a calibration run over the whole training split (else a few sampled batches)
    epoch_seconds: float | None = None  # a whole epoch (all training batches + the validation split), when run

    def summary(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class _StepTimer(Callback):
    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.train_ends: list[float] = []
        self.val_times: list[float] = []
        self.epoch_end: float | None = None
        self.t0 = time.perf_counter()
        self._tv = 0.0
        self.stopped = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.train_ends:
            self.t0 = time.perf_counter()   # the cap counts from the first step, not from Lightning's set-up
            self.train_ends.append(self.t0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_ends.append(time.perf_counter())
        # at least two steps: the first (allocation, autocast warm-up) is not timed when a second exists
        if time.perf_counter() - self.t0 > self.max_seconds and len(self.train_ends) >= 3:
            trainer.should_stop = True
            self.stopped = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._tv = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_times.append(time.perf_counter() - self._tv)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_end = time.perf_counter()


def probe(train_cfg, data, model: str, params: dict, *, batches: int = 4, max_seconds: float = 8.0,
          seed: int = 0, full_epoch: bool = False) -> ProbeResult:
    """Time ``batches`` training steps (and one validation batch) of ``model`` on ``data`` with ``train_cfg``
    (its batch size, precision, augmentation, imbalance handling, optimiser). ``full_epoch``: one whole epoch of
    the training split and the whole validation split instead, timed end to end (``epoch_seconds``) unless it
    runs past ``max_seconds``. Step speed is the median step (robust to a busy machine's spikes)."""
    t_start = time.perf_counter()
    torch.set_num_threads(train_cfg.num_threads or os.cpu_count() or 1)
    tr, va = data.train, data.val
    bs = min(train_cfg.batch_size, len(tr))
    rng = np.random.default_rng(seed)
    if full_epoch:
        tr_s, va_s = tr, va
    else:
        tr_s = tr.subset(np.sort(rng.choice(len(tr), min(len(tr), bs * batches), replace=False)))
        va_s = va.subset(np.arange(min(len(va), max(bs, 64))))
    mean, std = channel_stats(tr_s)
    torch.manual_seed(seed)
    net = build_network(model, tr.in_channels, tr.n_outputs, tr.spatial_dims, tr.image_shape, params, mean, std)
    cw, pw = class_weights(tr.class_counts(), tr.task, train_cfg.imbalance)
    cfg = train_cfg.model_copy(update={"ema": None, "ensemble": 1, "max_minutes": None, "progressive": None})
    module = ClassifierModule(net, tr.task, cfg, seed=seed, class_weights=cw, pos_weight=pw)
    timer = _StepTimer(max_seconds)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision=train_cfg.precision,
                        callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=None if full_epoch else 1)
    vbs = max(bs, 256) if full_epoch else len(va_s)
    trainer.fit(module, make_loader(tr_s, bs, "shuffle", seed), make_loader(va_s, vbs, "sequential"),
                weights_only=True)  # no checkpoint is read here; the house rule holds for every fit call
    steps = np.diff(timer.train_ends)
    timed = steps[1:] if len(steps) > 1 else steps
    train_speed = float(bs / max(float(np.median(timed)), 1e-9))
    n_val = len(va_s) if full_epoch else min(len(va_s), vbs)
    val_speed = float(n_val / max(sum(timer.val_times), 1e-9)) if timer.val_times else train_speed * 3
    epoch_s = (timer.epoch_end - timer.train_ends[0]) if full_epoch and timer.epoch_end and not timer.stopped \
        else None
    return ProbeResult(model=model, params=dict(params), size=list(tr.image_shape), precision=train_cfg.precision,
                       batch_size=bs, train_steps=int(len(timed)), train_img_per_s=train_speed,
                       val_img_per_s=val_speed, seconds=time.perf_counter() - t_start, stopped_early=timer.stopped,
                       full_epoch=full_epoch, epoch_seconds=epoch_s)
