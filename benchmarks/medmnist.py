"""MedMNIST benchmark: the shipped configs against the MedMNIST v2 paper, side by side.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/medmnist.py            # the three configs
    .venv/bin/python benchmarks/medmnist.py --configs configs/pneumoniamnist_cnn.yaml --threads 2
    .venv/bin/python benchmarks/medmnist.py --throughput-only
    .venv/bin/python benchmarks/medmnist.py --quick                                # smoke run only

Table 1 trains each config from scratch in this run (wall time includes data loading, training,
evaluation and the report) with ``train.num_threads = --threads``, and prints the test AUC / ACC it
measured with 95% bootstrap CIs, the test n and the thread count torch reports after training. Beside
them: published rows of the MedMNIST v2 paper (``benchmarks/baselines.py``, source printed under the
table) and the ratio ours / ResNet-18 (28) (3D: ResNet-18+3D). ACC is the MedMNIST evaluator's
(threshold 0.5 / argmax); the clinical ACC at the validation-chosen threshold is printed too.

Table 2 measures augmentation throughput on the same real images: medlens' batch augmentation
against a per-sample MONAI pipeline (RandAffine + RandFlip + intensity, DataLoader collate), the
pattern most MONAI tutorials use.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, set_threads, torch_threads

DEFAULT = ["configs/pneumoniamnist_cnn.yaml", "configs/retinamnist_cnn.yaml", "configs/adrenalmnist3d_cnn.yaml"]


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}-{m['ci_high']:.3f}]"


def _pair(b) -> str:
    return f"{b.auc:.3f} / {b.acc:.3f}" if b else "-"


def run_accuracy(configs: list[str], out: Path, threads: int, quick: bool) -> tuple[list[str], list[str]]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from baselines import REFERENCE_ROWS, baselines_for, sources

    from medlens.config import load_config
    from medlens.data.catalog import get_info
    from medlens.workflow.train import train

    lines = ["| dataset | config | test n | threads | ours AUC [95% CI] | ours ACC [95% CI] "
             "| clinical ACC (val threshold) | wall time | paper ResNet-18 (28) [3D: +3D] AUC/ACC | paper ResNet-50 (224) [3D: +3D] AUC/ACC "
             "| paper best AUC/ACC | AUC ratio vs paper R18 | ACC ratio vs paper R18 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    used: list = []
    for c in configs:
        cfg = for_benchmark(load_config(REPO / c), threads, quick)
        t0 = time.time()
        run = train(cfg, run_dir=out / (cfg.name + ("-quick" if quick else "")), overwrite=True,
                    progress_bar=False, log=lambda s: None)
        wall = time.time() - t0
        used_threads = torch_threads()  # what train() left set: the count it trained with
        m = json.loads((run / "metrics.json").read_text())
        test, n_test = m["test"]["metrics"], m["test"]["n"]
        base = baselines_for(cfg.data.name) if cfg.data.source == "medmnist" else {}
        r18 = r50 = best = None
        if base:
            table = next(iter(base.values())).table
            r18, r50 = (base.get(r) for r in REFERENCE_ROWS[table])
            best = max(base.values(), key=lambda b: b.auc)
            used += [b for b in (r18, r50, best) if b]
        # a ratio to a published figure only where the test split is the paper's (the official one, in full)
        same_split = bool(base) and n_test == get_info(cfg.data.name).n_samples["test"]
        ratio = (f"{test['auc']['value'] / r18.auc:.3f} | {test['medmnist_acc']['value'] / r18.acc:.3f}"
                 if r18 and same_split else "- | -" if not base else "- (not the paper's test split) | -")
        clinical = _fmt(test["accuracy"]) if m.get("threshold") else "(argmax)"
        lines.append(
            f"| {cfg.data.name or cfg.data.path} | {Path(c).name} | {n_test} | {used_threads} | {_fmt(test['auc'])} "
            f"| {_fmt(test['medmnist_acc'])} | {clinical} | {wall / 60:.1f} min | {_pair(r18)} | {_pair(r50)} "
            f"| {_pair(best)}{f' ({best.row})' if best else ''} | {ratio} |")
        print(lines[-1], flush=True)
    return lines, ([sources(used)] if used else [])


def run_throughput(threads: int, n: int = 2048, batch: int = 128, dataset: str = "pneumoniamnist") -> list[str]:
    import numpy as np
    import torch
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandScaleIntensity
    from torch.utils.data import DataLoader, TensorDataset

    from medlens.config import AugmentConfig
    from medlens.data.medmnist import load_medmnist
    from medlens.transforms.augment import BatchAugment

    used = set_threads(threads)
    images = load_medmnist(dataset).train.images[:n]
    x = torch.from_numpy(images).float() / 255
    if x.ndim == 3:
        x = x[:, None]   # (N, H, W) -> (N, 1, H, W)
    n = len(x)
    size = "x".join(map(str, x.shape[2:]))
    translate = 0.08
    aug = BatchAugment(AugmentConfig(hflip=0.5, rotate=10, translate=translate, scale=0.1, brightness=0.1,
                                     contrast=0.1))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        aug(x[i:i + batch], g)
    ours = n / (time.perf_counter() - t0)

    shift = tuple(translate * s for s in x.shape[2:])   # the same fraction of the image, in pixels
    monai_tf = Compose([RandFlip(prob=0.5, spatial_axis=1),
                        RandAffine(prob=1.0, rotate_range=np.deg2rad(10), translate_range=shift,
                                   scale_range=(0.1, 0.1), padding_mode="border"),
                        RandScaleIntensity(factors=0.1, prob=1.0), RandAdjustContrast(prob=1.0, gamma=(0.9, 1.1))])
    monai_tf.set_random_state(0)

    class DS(TensorDataset):
        def __getitem__(self, i):
            return monai_tf(self.tensors[0][i])

    loader = DataLoader(DS(x), batch_size=batch, num_workers=0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    ref = n / (time.perf_counter() - t0)
    return [f"| augmentation pipeline ({dataset} train, first {n} images, {size} px, batches of {batch}, "
            f"{used} torch threads) | images/s | ratio |", "|---|---|---|",
            f"| medlens BatchAugment (whole batch as tensors) | {ours:,.0f} | {ours / ref:.1f}x |",
            f"| MONAI per-sample Compose + DataLoader collate | {ref:,.0f} | 1.0x |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=DEFAULT)
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--throughput-only", action="store_true")
    add_common_args(ap)
    args = ap.parse_args()
    quick_banner(args.quick)
    tables = []
    if not args.throughput_only:
        print("Accuracy against the MedMNIST v2 paper, each config trained now on this machine:")
        lines, cites = run_accuracy(args.configs, Path(args.out), args.threads, args.quick)
        tables.append("\n".join(lines + ([""] + [f"Paper columns: {s}." for s in cites] if cites else [])))
    tables.append("\n".join(run_throughput(args.threads, n=256 if args.quick else 2048)))
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
