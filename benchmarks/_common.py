"""What every benchmark script shares: the import path, the thread count it trains and times with,
a ``--quick`` smoke mode, and the provenance line of a run folder it did not train itself."""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def add_common_args(ap: argparse.ArgumentParser, trains: bool = True) -> None:
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for training and timing (default: all CPUs, %(default)s here); "
                         + ("set as train.num_threads in the config trained, " if trains else "")
                         + "and the count torch reports is printed")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny data and epochs; the figures only show that the script works")


def set_threads(n: int) -> int:
    """Set torch's intra-op threads; return what torch reports back (the figure a table may print)."""
    import torch

    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def for_benchmark(cfg, threads: int, quick: bool, max_samples: int = 256):
    """The config a benchmark trains: ``train.num_threads`` set (``train()`` applies it, so the thread
    count printed is the one used); with ``quick``, one epoch on a capped split and a small bootstrap."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.num_threads = threads
    if quick:
        cfg.train.warmup_epochs = 0
        cfg.train.epochs = 1
        cfg.evaluation.bootstrap = min(cfg.evaluation.bootstrap, 50)
        if cfg.task == "segmentation":
            cfg.segmentation.patches_per_epoch = min(cfg.segmentation.patches_per_epoch, 32)
            cfg.segmentation.val_every = 1
        else:
            cfg.data.max_samples = max_samples
    return cfg


def run_provenance(run_dir: str | Path) -> str:
    """'<folder>, written <date>, config sha256 <hash>': how a table names a run it did not train now."""
    run = Path(run_dir)
    meta = run / "run.json"
    when = (_dt.datetime.fromtimestamp(meta.stat().st_mtime).isoformat(timespec="seconds")
            if meta.is_file() else "unknown date")
    cfg = run / "config.yaml"
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:12] if cfg.is_file() else "no config.yaml"
    return f"{run}, written {when}, config sha256 {digest}"


def quick_banner(quick: bool, what: str = "tiny data and one epoch") -> None:
    if quick:
        print(f"QUICK SMOKE RUN (--quick): {what}; no figure below is a benchmark result.\n")
