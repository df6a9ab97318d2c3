"""``medlens train``: config -> the task's training path -> run folder. The orchestrator opens the folder
through the run life-cycle (``workflow.lifecycle``: check, lock, marker), seeds, and hands over to the task's
path, which chains data -> fit (engine) -> run contract -> threshold on validation -> evaluation ->
explanations -> report: classifiers (``workflow.classifier``, ensembles ``workflow.ensemble``), segmentation
(``workflow.segmentation``), anomaly (``workflow.anomaly``).

A run is a folder ``<output_dir>/<name>/`` holding ``.medlens-run`` (the marker), ``config.yaml``,
``run.json`` (``RunMeta``), the weights (``model.pt``, or ``model.skops``), ``checkpoints/`` (resume),
``history.csv``, ``metrics.json``, ``predictions.csv``, ``plots/`` and ``report.html``. A lock file keeps a
second writer out while it trains.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from medlens.config import ExperimentConfig
from medlens.engine.distributed import plan
from medlens.engine.train import seed_everything
from medlens.errors import MedlensWarning
from medlens.workflow.anomaly import train_anomaly
from medlens.workflow.classifier import train_classifier
from medlens.workflow.lifecycle import Progress, RunStart, resolve_run_dir
from medlens.workflow.segmentation import train_segmentation

# The training path of each config task (``Task.config_name``); any other family (one output vector per case,
# like a regression) trains on the classifier's path. A family that needs its own path adds its entry here.
PATHS = {"classification": train_classifier, "segmentation": train_segmentation, "anomaly": train_anomaly}

__all__ = ["resolve_run_dir", "train"]


def train(cfg: ExperimentConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, callbacks: list | None = None, progress_bar: bool = True,
          log: Callable[[str], None] = print, progress: Progress | None = None) -> Path:
    """Train, evaluate, explain and report one experiment; return its run folder.

    ``progress(done, total, what)`` follows the loading of the data (``what`` "loading", then "loaded" once they
    are in memory; ``lifecycle.loading``); the fit shows Lightning's bar when ``progress_bar``."""
    path = resolve_run_dir(cfg, run_dir)
    if plan(cfg.train).rank != 0:  # a data-parallel process started by torchrun/srun: fit, write nothing
        seed_everything(cfg.seed)
        train_classifier(cfg, path, resume, callbacks, False, log, writer=False)
        return path
    with RunStart(path, resume=resume, overwrite=overwrite) as from_ckpt:
        if resume and not from_ckpt:
            warnings.warn("the run was stopped before its first checkpoint: training starts again from epoch 0",
                          MedlensWarning, stacklevel=2)
        seed_everything(cfg.seed)
        torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
        PATHS.get(cfg.task, train_classifier)(cfg, path, from_ckpt, callbacks, progress_bar, log, progress=progress)
    return path  # the run's folder (Run.dir)
