"""Speed probes for the planner: a few real training steps of a candidate on real batches.

A probe builds the candidate network behind the run's normalisation, wraps it in the training module with the
planned augmentation, loss and precision, and runs Lightning on a handful of training batches and one
validation batch of the real data, timing each step. The first step (allocation, autocast warm-up) is dropped
when more than one was run. A probe stops early once it has spent ``max_seconds``, so an infeasible candidate
(a large 3D input on a CPU) costs seconds, not minutes, to rule out.

``MachineFigures`` keeps the figures a plan rests on (probe results, loading seconds) once per machine
(``$MEDLENS_CACHE/machine.json``, else ``~/.cache/medlens/machine.json``), keyed by the machine (CPU model, core
count, torch version) and the workload; a later plan of the same workload reuses them instead of measuring the
machine's momentary load again, so the same data, budget and seed give the same plan (docs/auto.md).

``signal`` is the architecture choice's short cross-validated signal (issue 30 item 2): a fixed number of seeded
optimiser steps of a candidate on the other folds of train + validation pooled, and its AUC on one held-out fold.
The test split is never part of it; the result is stored with the probe figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from medlens.data.splits import Pooled, cv_folds, cv_splits
from medlens.engine.module import ClassifierModule, validation_scores
from medlens.engine.sampling import make_loader
from medlens.engine.train import build_network, channel_stats, class_weights, fit_classifier
from medlens.utils import write_json_atomic

CACHE_ENV = "MEDLENS_CACHE"
FIGURES_VERSION = 1


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
    full_epoch: bool = False    # a calibration run (``calibrate``): whole epochs of real training
    epoch_seconds: float | None = None  # one steady whole epoch (training batches + validation), when measured
    fixed_seconds: float | None = None  # a fit's cost besides its steady epochs (set-up, warm-up, best weights)
    epoch_train_n: int = 0      # the calibration's training cases
    epoch_val_n: int = 0        # and its validation (held-out) cases

    def summary(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class _StepTimer(Callback):
    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.train_ends: list[float] = []
        self.val_times: list[float] = []
        self.val_epochs = 0
        self.epoch_starts: list[float] = []
        self.t0 = time.perf_counter()
        self._tv = 0.0
        self.stopped = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_starts.append(time.perf_counter())

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
        self.val_epochs += 1


def probe(train_cfg, data, model: str, params: dict, *, batches: int = 4, max_seconds: float = 8.0,
          seed: int = 0) -> ProbeResult:
    """Time ``batches`` training steps (and one validation batch) of ``model`` on ``data`` with ``train_cfg``
    (its batch size, precision, augmentation, imbalance handling, optimiser). Step speed is the median step
    (robust to a busy machine's spikes)."""
    t_start = time.perf_counter()
    torch.set_num_threads(train_cfg.num_threads or os.cpu_count() or 1)
    tr, va = data.train, data.val
    bs = min(train_cfg.batch_size, len(tr))
    rng = np.random.default_rng(seed)
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
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, make_loader(tr_s, bs, "shuffle", seed), make_loader(va_s, len(va_s), "sequential"),
                weights_only=True)  # no checkpoint is read here; the house rule holds for every fit call
    train_speed, val_speed, n_timed = _speeds(timer, bs, len(va_s))
    return ProbeResult(model=model, params=dict(params), size=list(tr.image_shape), precision=train_cfg.precision,
                       batch_size=bs, train_steps=n_timed, train_img_per_s=train_speed, val_img_per_s=val_speed,
                       seconds=time.perf_counter() - t_start, stopped_early=timer.stopped)


def _speeds(timer: _StepTimer, bs: int, n_val: int) -> tuple[float, float, int]:
    """(training images/s of the median timed step, validation images/s over every validation pass of ``n_val``
    images, steps timed)."""
    steps = np.diff(timer.train_ends)
    timed = steps[1:] if len(steps) > 1 else steps
    train_speed = float(bs / max(float(np.median(timed)), 1e-9))
    val_speed = float(n_val * max(timer.val_epochs, 1) / max(sum(timer.val_times), 1e-9)) if timer.val_times \
        else train_speed * 3
    return train_speed, val_speed, int(len(timed))


CAL_EPOCHS = 4          # the calibration's whole epochs: the first holds the warm-up, the median of the rest is b
CAL_EMA = 0.999         # a weight average as the planned run keeps one (its cost per step, not its decay, matters)


def calibrate(train_cfg, data, model: str, params: dict, *, folds: int = 0, epochs: int = CAL_EPOCHS,
              max_seconds: float = 60.0, seed: int = 0) -> ProbeResult:
    """Time real training: ``epochs`` whole epochs of ``model`` through ``engine.train.fit_classifier`` (the run's
    loaders, loss, weight average, checkpoints and history, in a temporary folder) on what one member of the plan
    trains on: fold 0 of ``folds`` of train + validation pooled (a cross-validated plan's fold model), or the
    training split validated on the validation split (``folds`` 0). The test split is not read.

    A fit of n epochs costs a + b*n (issue 30 item 3): b (``epoch_seconds``) is one steady epoch, the median of
    epochs 2..n-1, each timed from its start to the next one's (checkpoint and history included); a
    (``fixed_seconds``) is everything else the fit cost: building the network, Lightning's set-up, the first
    epoch's warm-up, loading the best weights. A calibration that runs past ``max_seconds`` stops: only the step
    speeds are kept, and the planner extrapolates from them."""
    t_start = time.perf_counter()
    torch.set_num_threads(train_cfg.num_threads or os.cpu_count() or 1)
    split = cv_splits(data, folds, seed)[2][0] if folds else data
    tr = split.train
    bs = min(train_cfg.batch_size, len(tr))
    mean, std = channel_stats(tr)
    torch.manual_seed(seed)
    net = build_network(model, tr.in_channels, tr.n_outputs, tr.spatial_dims, tr.image_shape, params, mean, std)
    tc = train_cfg.model_copy(update={"epochs": epochs, "ema": train_cfg.ema or CAL_EMA, "ensemble": 1,
                                      "cv_folds": 0, "max_minutes": None, "progressive": None,
                                      "early_stopping_patience": None, "devices": 1, "num_nodes": 1})
    timer = _StepTimer(max_seconds)
    with tempfile.TemporaryDirectory(prefix="medlens-calibration-") as tmp:
        fit_classifier(SimpleNamespace(train=tc, seed=seed), split, net, Path(tmp), False, callbacks=[timer],
                       progress_bar=False)
    total = time.perf_counter() - t_start
    train_speed, val_speed, n_timed = _speeds(timer, bs, len(split.val))
    epoch_s = fixed = None
    starts = timer.epoch_starts
    if not timer.stopped and len(starts) == epochs >= 3:
        epoch_s = float(np.median(np.diff(starts)[1:]))   # epochs 2..n-1, each start to the next start
        fixed = max(0.0, total - epochs * epoch_s)
    return ProbeResult(model=model, params=dict(params), size=list(tr.image_shape), precision=train_cfg.precision,
                       batch_size=bs, train_steps=n_timed, train_img_per_s=train_speed, val_img_per_s=val_speed,
                       seconds=total, stopped_early=timer.stopped, full_epoch=True, epoch_seconds=epoch_s,
                       fixed_seconds=fixed, epoch_train_n=len(tr), epoch_val_n=len(split.val))


@dataclass
class SignalResult:
    """A candidate's short cross-validated signal: ``steps`` optimiser steps on the other folds of train+val,
    the AUC on the held-out fold (at most ``n_held`` of its cases)."""

    model: str
    params: dict
    steps: int
    folds: int
    n_train: int
    n_held: int
    auc: float
    seconds: float              # wall time the signal run cost (training and the held-out prediction)

    def summary(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def signal(train_cfg, data, model: str, params: dict, *, steps: int, folds: int = 5, max_held: int = 512,
           seed: int = 0) -> SignalResult:
    """``steps`` seeded optimiser steps of ``model`` (``train_cfg``'s batch size, precision, augmentation, loss and
    optimiser, the cosine schedule over those steps) on folds 1..k-1 of ``data``'s train + validation splits
    pooled (``data.splits.cv_folds``, seeded), then the AUC of its predictions on fold 0 (a seeded sample of at
    most ``max_held`` cases). Only the train and validation splits are read."""
    t_start = time.perf_counter()
    torch.set_num_threads(train_cfg.num_threads or os.cpu_count() or 1)
    pool = Pooled([data.train, data.val], name="signal")
    fs = cv_folds(pool.labels, pool.patient_ids, folds, seed)
    held = fs[0]
    if len(held) > max_held:
        held = np.sort(np.random.default_rng(seed).choice(held, max_held, replace=False))
    tr, va = pool.subset(np.concatenate(fs[1:]), "signal/train"), pool.subset(held, "signal/held")
    bs = min(train_cfg.batch_size, len(tr))
    epochs = max(1, math.ceil(steps / math.ceil(len(tr) / bs)))
    mean, std = channel_stats(tr)
    torch.manual_seed(seed)
    net = build_network(model, tr.in_channels, tr.n_outputs, tr.spatial_dims, tr.image_shape, params, mean, std)
    cw, pw = class_weights(tr.class_counts(), tr.task, train_cfg.imbalance)
    cfg = train_cfg.model_copy(update={"ema": None, "ensemble": 1, "max_minutes": None, "progressive": None,
                                       "epochs": epochs, "warmup_epochs": 0})
    module = ClassifierModule(net, tr.task, cfg, seed=seed, class_weights=cw, pos_weight=pw)
    trainer = L.Trainer(max_steps=int(steps), max_epochs=epochs, accelerator="cpu", devices=1,
                        precision=train_cfg.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, make_loader(tr, bs, "shuffle", seed), weights_only=True)
    net = module.final_network().eval()
    outs, ys = [], []
    with torch.no_grad():
        for i in range(0, len(va), 256):
            x, y = va.batch(np.arange(i, min(i + 256, len(va))))
            outs.append(net(x).float())
            ys.append(y)
    task = module.task_type
    auc = validation_scores(task, task.activation(torch.cat(outs)), torch.cat(ys))["val_auc"]
    return SignalResult(model=model, params=dict(params), steps=int(trainer.global_step), folds=folds,
                        n_train=len(tr), n_held=len(va), auc=float(auc), seconds=time.perf_counter() - t_start)


# ---------------------------------------------------------------- per-machine figures
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """What a plan's figures are valid for: CPU model, core count, torch version."""
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "torch": torch.__version__}


def figures_file() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "medlens"
    return root / "machine.json"


def _valid_probe(d: Any) -> ProbeResult | None:
    """A cached probe result, or None when the entry is not one (a hand-edited or foreign file)."""
    if not isinstance(d, dict) or set(d) != {f.name for f in fields(ProbeResult)}:
        return None
    try:
        r = ProbeResult(**d)
    except TypeError:
        return None
    speeds = (r.train_img_per_s, r.val_img_per_s, r.seconds)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in speeds) \
            or r.train_img_per_s <= 0 or r.val_img_per_s <= 0 or r.seconds < 0 \
            or not isinstance(r.batch_size, int) or r.batch_size < 1 \
            or not (r.epoch_seconds is None or (isinstance(r.epoch_seconds, (int, float))
                                                and math.isfinite(r.epoch_seconds) and r.epoch_seconds > 0)):
        return None
    return r


def _valid_signal(d: Any) -> SignalResult | None:
    """A cached signal result, or None when the entry is not one."""
    if not isinstance(d, dict) or set(d) != {f.name for f in fields(SignalResult)}:
        return None
    try:
        r = SignalResult(**d)
    except TypeError:
        return None
    ints = (r.steps, r.folds, r.n_train, r.n_held)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in (r.auc, r.seconds)) or not 0 <= r.auc <= 1 or r.seconds < 0 \
            or not isinstance(r.model, str) or not isinstance(r.params, dict):
        return None
    return r


def _valid_seconds(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return float(v) if ok else None


class MachineFigures:
    """This machine's measured figures, measured once per workload and reused (``machine.json``).

    ``probe(key, measure)``: the cached probe result of the workload ``key`` (a JSON-able dict), else
    ``measure()``'s, rounded as the plan records it (``ProbeResult.summary``) and stored. ``seconds(key, measured)``:
    the same for a duration that is measured anyway (loading the data). ``recalibrate``: measure everything again
    and replace the stored figures. A file that cannot be read or holds invalid entries is reported through
    ``log`` and those entries are measured again; the file is written atomically after each new figure."""

    def __init__(self, path: Path | None = None, *, recalibrate: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.path, self.recalibrate, self.log = path or figures_file(), recalibrate, log
        self.machine = machine()
        self.key = json.dumps(self.machine, sort_keys=True)
        self.data: dict[str, Any] = {"version": FIGURES_VERSION, "machines": {}}
        self.reused = 0
        self.measured = 0
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(d, dict) or d.get("version") != FIGURES_VERSION \
                        or not isinstance(d.get("machines"), dict):
                    raise ValueError("not a medlens machine file of this version")
                self.data = d
            except (OSError, ValueError) as e:
                self.log(f"{self.path}: unreadable machine figures ({str(e)[:80]}); measuring again")
        entry = self.data["machines"].get(self.key)
        if not isinstance(entry, dict) or not isinstance(entry.get("figures"), dict):
            entry = {"machine": self.machine, "figures": {}}
            self.data["machines"][self.key] = entry
        self.figures: dict[str, Any] = entry["figures"]

    def _cached(self, k: str, check: Callable[[Any], Any]) -> Any:
        if self.recalibrate or k not in self.figures:
            return None
        v = check(self.figures[k])
        if v is None:
            self.log(f"{self.path}: an invalid cached figure; measuring it again")
        return v

    def _store(self, k: str, value: Any) -> None:
        self.figures[k] = value
        self.measured += 1
        try:
            write_json_atomic(self.path, self.data)
        except OSError as e:     # a read-only home: the plan still holds, only the next one measures again
            self.log(f"{self.path}: machine figures not saved ({e.strerror or e})")

    def probe(self, key: dict, measure: Callable[[], ProbeResult]) -> tuple[ProbeResult, bool]:
        """(the figure, whether it came from the file)."""
        k = "probe " + json.dumps(key, sort_keys=True)
        r = self._cached(k, _valid_probe)
        if r is not None:
            self.reused += 1
            return r, True
        s = measure().summary()
        self._store(k, s)
        return ProbeResult(**s), False

    def signal(self, key: dict, measure: Callable[[], SignalResult]) -> tuple[SignalResult, bool]:
        """A candidate's cross-validated signal (``signal``), measured once per workload; (it, whether stored)."""
        k = "signal " + json.dumps(key, sort_keys=True)
        r = self._cached(k, _valid_signal)
        if r is not None:
            self.reused += 1
            return r, True
        s = measure().summary()
        self._store(k, s)
        return SignalResult(**s), False

    def seconds(self, key: dict, measured: float) -> float:
        k = "seconds " + json.dumps(key, sort_keys=True)
        v = self._cached(k, _valid_seconds)
        if v is not None:
            self.reused += 1
            return v
        v = round(float(measured), 2)
        self._store(k, v)
        return v
