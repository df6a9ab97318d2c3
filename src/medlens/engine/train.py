"""Training orchestration: config -> data -> model -> Lightning fit -> run folder -> evaluation -> report.

A run is a folder ``<output_dir>/<name>/`` holding the resolved ``config.yaml``, ``run.json``
(what is needed to rebuild the model), ``model.pt`` (weights only), ``checkpoints/``
(``last.ckpt`` for resume, ``best.ckpt``), ``history.csv``, ``metrics.json``,
``predictions.csv``, ``plots/`` and ``report.html``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medlens.config import ExperimentConfig, dump_config
from medlens.data import SplitData, build_data
from medlens.data.catalog import BINARY, MULTILABEL
from medlens.engine.module import ClassifierModule, ClassifierNet
from medlens.engine.sampling import make_loader
from medlens.errors import ConfigError, MedlensError
from medlens.models import create_model
from medlens.models.transfer import apply_transfer
from medlens.utils import atomic_path, seed_everything, write_json_atomic, write_text_atomic

IMBALANCE_MODES = {"none": "shuffle", "weighted_loss": "shuffle", "balanced_sampler": "balanced",
                   "undersample": "undersample"}


class TrainingInterrupted(MedlensError):
    """Training stopped before its last epoch; ``medlens train --resume`` continues it."""


def channel_stats(ds) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a dataset's images in the model's input scale."""
    idx = np.sort(np.random.default_rng(0).choice(len(ds), min(len(ds), 4096), replace=False))
    xs = ds.batch(idx)[0].numpy().astype(np.float64)  # the model's input scale, whatever the storage
    axes = (0,) + tuple(range(2, xs.ndim))
    return xs.mean(axis=axes).tolist(), xs.std(axis=axes).tolist()


def build_network(meta: dict) -> ClassifierNet:
    """Rebuild the (untrained) network of a run from its ``run.json`` metadata."""
    net = create_model(meta["model"], meta["in_channels"], meta["n_outputs"], meta["spatial_dims"],
                       tuple(meta["input_size"]), **meta.get("model_params", {}))
    c = meta["in_channels"]
    return ClassifierNet(net, meta.get("mean", [0.0] * c), meta.get("std", [1.0] * c))


def _class_weights(data: SplitData, mode: str):
    if mode != "weighted_loss" or data.task == MULTILABEL:
        return None, None
    counts = data.train.class_counts().astype(float)
    if data.task == BINARY:
        return None, float(counts[0] / max(counts[1], 1))
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32), None


def resolve_run_dir(cfg: ExperimentConfig, run_dir: str | Path | None) -> Path:
    return Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name


def train(cfg: ExperimentConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, callbacks: list | None = None, progress_bar: bool = True,
          log: Callable[[str], None] = print) -> Path:
    """Train, evaluate and report one experiment; return its run folder."""
    run = resolve_run_dir(cfg, run_dir)
    ckpt_dir = run / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if run.exists() and not resume and not overwrite and any(run.iterdir()):
        hint = "--resume to continue it" if last.exists() and not (run / "model.pt").exists() else "--overwrite"
        raise MedlensError(f"run folder already exists; use {hint}, or another name", run)
    if resume and not last.exists():
        raise MedlensError("nothing to resume: no checkpoints/last.ckpt", run)
    if overwrite and not resume:
        import shutil

        shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
    if cfg.task == "segmentation":
        return _train_segmentation(cfg, run, resume, callbacks, progress_bar, t0)

    data = build_data(cfg.data, seed=cfg.seed)
    tr = data.train
    if len(tr) == 0 or len(data.val) == 0 or len(data.test) == 0:
        raise MedlensError(f"empty split: train {len(tr)}, val {len(data.val)}, test {len(data.test)}")
    mean, std = channel_stats(tr) if cfg.data.normalize == "dataset" else ([0.0] * tr.in_channels,
                                                                             [1.0] * tr.in_channels)
    meta = {
        "model": cfg.model.name, "model_params": cfg.model.params, "in_channels": tr.in_channels,
        "n_outputs": tr.n_outputs, "spatial_dims": tr.spatial_dims, "input_size": list(tr.image_shape),
        "task": data.task, "class_names": data.class_names, "mean": mean, "std": std,
        "color": cfg.data.color, "split_method": data.split_method,
        "n_samples": {s: len(data.get(s)) for s in ("train", "val", "test")},
        "class_counts": {s: data.get(s).class_counts().tolist() for s in ("train", "val", "test")},
        "dataset": cfg.data.name or cfg.data.path,
    }
    from medlens.engine.classical import CLASSICAL_MODELS

    if cfg.model.name in CLASSICAL_MODELS:
        return _train_classical(cfg, run, data, meta, t0)
    torch.manual_seed(cfg.seed)
    net = build_network(meta)
    if cfg.model.pretrained or cfg.model.freeze:
        info = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
        meta["transfer"] = info
        log(f"transfer: loaded {info['loaded']} tensors, skipped {len(info['skipped'])}, "
            f"frozen {info['frozen']} parameters")
    if cfg.train.channels_last and tr.spatial_dims == 2:
        net = net.to(memory_format=torch.channels_last)
    cw, pw = _class_weights(data, cfg.train.imbalance)
    module = ClassifierModule(net, data.task, cfg.train, seed=cfg.seed, class_weights=cw, pos_weight=pw)

    write_text_atomic(run / "config.yaml", dump_config(cfg))
    write_json_atomic(run / "run.json", meta)

    mode = IMBALANCE_MODES[cfg.train.imbalance]
    train_loader = make_loader(tr, cfg.train.batch_size, mode, cfg.seed, cfg.train.undersample_ratio)
    val_loader = make_loader(data.val, max(cfg.train.batch_size, 256), "sequential")
    monitor = cfg.train.monitor
    if monitor not in ("val_auc", "val_acc", "val_loss", "val_qwk"):
        raise ConfigError(f"train.monitor '{monitor}' is not one of val_auc, val_acc, val_loss, val_qwk")
    best_score = _fit(cfg, module, train_loader, val_loader, run, monitor, resume, callbacks, progress_bar)
    _save_best(module, run)
    net = module.model.to(memory_format=torch.contiguous_format)
    _finish_meta(meta, t0, best_score, monitor)
    write_json_atomic(run / "run.json", meta)

    from medlens.evaluation.evaluate import evaluate_run
    from medlens.report.html import write_report

    evaluate_run(run, data=data, net=net)
    from medlens.explain.run import write_report_section

    write_report_section(run, "gradcam")
    write_report(run)
    return run


def _train_segmentation(cfg: ExperimentConfig, run: Path, resume: bool, callbacks, progress_bar: bool,
                        t0: float) -> Path:
    """U-Net training on patches; whole-image validation; threshold on validation; test evaluation."""
    from torch.utils.data import DataLoader

    from medlens.data.segmentation import PatchSampler, load_segmentation
    from medlens.engine.segmentation import SegmentationModule, WholeImages
    from medlens.evaluation.segmentation import evaluate_segmentation_run, select_threshold
    from medlens.models.registry import get_model_entry
    from medlens.report.html import write_report

    seg = cfg.segmentation
    if get_model_entry(cfg.model.name).task != "segmentation":
        raise ConfigError(f"model '{cfg.model.name}' is a classifier; a segmentation run needs unet or basic_unet")
    if cfg.train.monitor not in ("val_auc", "val_dice"):  # val_auc: the default, left unset
        raise ConfigError(f"train.monitor '{cfg.train.monitor}': segmentation runs monitor val_dice")
    monitor = "val_dice"
    data = load_segmentation(cfg.data, seg, seed=cfg.seed)
    if not data.train or not data.val or not data.test:
        raise MedlensError(f"empty split: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    first = data.train[0]
    n_cls = len(data.class_names)
    if cfg.data.normalize == "dataset":
        flat = np.concatenate([c.image.reshape(c.image.shape[0], -1) for c in data.train], axis=1)
        mean, std = flat.mean(1).tolist(), flat.std(1).tolist()
        del flat
    else:
        mean, std = [0.0] * first.image.shape[0], [1.0] * first.image.shape[0]
    meta = {
        "model": cfg.model.name, "model_params": cfg.model.params, "in_channels": int(first.image.shape[0]),
        "n_outputs": 1 if n_cls == 2 else n_cls, "spatial_dims": first.image.ndim - 1,
        "input_size": list(seg.patch_size), "task": "segmentation", "class_names": data.class_names,
        "mean": mean, "std": std, "color": cfg.data.color, "clahe": cfg.data.clahe, "intensity": cfg.data.intensity,
        "window": cfg.data.window, "pixel_spacing": cfg.data.pixel_spacing, "label_values": seg.label_values,
        "segmentation": seg.model_dump(), "split_method": data.split_method,
        "n_samples": {s: len(data.get(s)) for s in ("train", "val", "test")},
        "patients": {s: sorted({c.patient_id for c in data.get(s)}) for s in ("train", "val", "test")},
        "dataset": cfg.data.path,
    }
    torch.manual_seed(cfg.seed)
    net = build_network(meta)
    if cfg.model.pretrained or cfg.model.freeze:
        meta["transfer"] = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
    sampler = PatchSampler(data.train, seg.patch_size, seg.patches_per_epoch, seg.foreground_ratio, cfg.seed)
    module = SegmentationModule(net, cfg.train, seg, meta["n_outputs"], seed=cfg.seed, sampler=sampler)
    write_text_atomic(run / "config.yaml", dump_config(cfg))
    write_json_atomic(run / "run.json", meta)
    train_loader = DataLoader(sampler, batch_size=cfg.train.batch_size, shuffle=False, drop_last=False)
    val_loader = DataLoader(WholeImages(data.val), batch_size=1, shuffle=False)
    best = _fit(cfg, module, train_loader, val_loader, run, monitor, resume, callbacks, progress_bar)
    _save_best(module, run)
    net = module.model
    _finish_meta(meta, t0, best, monitor)
    meta["threshold"], meta["val_dice_at_threshold"] = select_threshold(net, data.val, meta)
    write_json_atomic(run / "run.json", meta)
    evaluate_segmentation_run(run, data=data, net=net)
    write_report(run)
    return run


def _fit(cfg: ExperimentConfig, module, train_loader, val_loader, run: Path, monitor: str, resume: bool,
         callbacks: list | None, progress_bar: bool) -> tuple[float | None, int]:
    """Lightning fit with best/last checkpoints and history; returns (best monitored value, epochs run)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    ckpt_dir = run / "checkpoints"
    mode_mm = "min" if monitor == "val_loss" else "max"
    cbs = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode_mm, save_top_k=1,
                           save_last=True, enable_version_counter=False),
           HistoryWriter(run / "history.csv")]
    if cfg.train.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode_mm, patience=cfg.train.early_stopping_patience))
    trainer = L.Trainer(max_epochs=cfg.train.epochs, accelerator="cpu" if not torch.cuda.is_available() else "auto",
                        devices=1, precision=cfg.train.precision, callbacks=cbs + list(callbacks or []),
                        logger=False, enable_progress_bar=progress_bar, enable_model_summary=False,
                        deterministic=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_dir / "last.ckpt") if resume else None,
                weights_only=True)
    if trainer.interrupted or trainer.current_epoch < cfg.train.epochs and not trainer.should_stop:
        raise TrainingInterrupted(f"training stopped at epoch {trainer.current_epoch}; resume with "
                                  f"`medlens train {run / 'config.yaml'} --resume`", run)
    score = cbs[0].best_model_score
    return (float(score) if score is not None else None), int(trainer.current_epoch)


def _save_best(module, run: Path) -> None:
    """Load the best checkpoint (else the last) into ``module`` and write its weights as ``model.pt``."""
    ckpt_dir = run / "checkpoints"
    best = ckpt_dir / "best.ckpt"
    state = torch.load(best if best.exists() else ckpt_dir / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    module.load_state_dict(state)
    with atomic_path(run / "model.pt") as tmp:
        torch.save(module.model.to(memory_format=torch.contiguous_format).state_dict(), tmp)


def _finish_meta(meta: dict, t0: float, best: tuple[float | None, int], monitor: str) -> None:
    meta["train_seconds"] = round(time.time() - t0, 1)
    meta["epochs_run"] = best[1]
    meta["best_epoch_metric"] = {monitor: best[0]}
    meta["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "machine": platform.machine()}


def _train_classical(cfg: ExperimentConfig, run: Path, data, meta: dict, t0: float) -> Path:
    """Features + random forest / SVM through the same run folder, evaluation and report."""
    import pandas as pd

    from medlens.engine.classical import dataset_features, fit_classical, save_model
    from medlens.evaluation.evaluate import evaluate_run
    from medlens.evaluation.metrics import compute_metrics
    from medlens.report.html import write_report

    meta["kind"] = "classical"
    write_text_atomic(run / "config.yaml", dump_config(cfg))
    X = dataset_features(data.train)
    model = fit_classical(cfg.model.name, X, data.train.labels, cfg.seed, cfg.model.params)
    save_model(model, run / "model.skops")

    def predictor(ds):
        p = model.predict_proba(dataset_features(ds))
        return p[:, 1] if data.task == "binary" else p

    val_m = compute_metrics(data.task, data.val.labels, predictor(data.val), 0.5, n_boot=0)["metrics"]
    with atomic_path(run / "history.csv") as tmp:
        pd.DataFrame([{"epoch": 0, "val_auc": val_m["auc"]["value"], "val_acc": val_m["medmnist_acc"]["value"]}]
                     ).to_csv(tmp, index=False)
    meta.update(train_seconds=round(time.time() - t0, 1), epochs_run=1, n_features=int(X.shape[1]),
                environment={"python": platform.python_version(), "threads": os.cpu_count()})
    write_json_atomic(run / "run.json", meta)
    evaluate_run(run, data=data, predictor=predictor)
    write_report(run)
    return run


def _history_row(trainer) -> dict:
    row = {"epoch": int(trainer.current_epoch)}
    for k, v in trainer.callback_metrics.items():
        row[k] = float(v)
    return row


import lightning.pytorch.callbacks as _cb  # noqa: E402


class HistoryWriter(_cb.Callback):
    """Appends one row per epoch to ``history.csv`` (rewritten atomically; survives resume)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import pandas as pd

        rows = pd.read_csv(self.path).to_dict("records") if self.path.exists() else []
        rows = [r for r in rows if r["epoch"] < trainer.current_epoch] + [_history_row(trainer)]
        with atomic_path(self.path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
