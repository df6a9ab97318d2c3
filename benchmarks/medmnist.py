"""MedMNIST benchmark: the shipped configs against the MedMNIST v2 paper, side by side.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/medmnist.py            # both datasets
    .venv/bin/python benchmarks/medmnist.py --configs configs/pneumoniamnist_cnn.yaml
    .venv/bin/python benchmarks/medmnist.py --throughput-only

Table 1 trains each config from scratch (wall time includes data loading, training, evaluation
and the report) and prints test AUC / ACC with 95% bootstrap CIs beside the published ResNet-18
(28), ResNet-50 (224) and best baseline of Yang et al., Sci Data 2023 (Table 3), with the ratio
ours / ResNet-18 (28). ACC is the MedMNIST evaluator's (threshold 0.5 / argmax); the clinical ACC
at the validation-chosen threshold is printed too.

Table 2 measures augmentation throughput on the same real images: medlens' batch augmentation
against a per-sample MONAI pipeline (RandAffine + RandFlip + intensity, DataLoader collate), the
pattern most MONAI tutorials use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

DEFAULT = ["configs/pneumoniamnist_cnn.yaml", "configs/retinamnist_cnn.yaml", "configs/adrenalmnist3d_cnn.yaml"]


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}-{m['ci_high']:.3f}]"


def run_accuracy(configs: list[str], out: Path) -> list[str]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from medlens.config import load_config
    from medlens.data.catalog import PAPER_BASELINES
    from medlens.workflow.train import train

    lines = ["| dataset | config | ours AUC [95% CI] | ours ACC [95% CI] | clinical ACC (val threshold) | wall time "
             "| R18(28) AUC/ACC (3D: R18+3D) | R50(224) AUC/ACC (3D: R50+3D) | best baseline AUC/ACC | AUC ratio vs R18(28) | ACC ratio vs R18(28) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        cfg = load_config(REPO / c)
        t0 = time.time()
        run = train(cfg, run_dir=out / cfg.name, overwrite=True, progress_bar=False, log=lambda s: None)
        wall = time.time() - t0
        m = json.loads((run / "metrics.json").read_text())
        test = m["test"]["metrics"]
        base = PAPER_BASELINES.get(cfg.data.name, {})
        r18 = base.get("ResNet-18 (28)") or base.get("ResNet-18+3D (28)")
        r50 = base.get("ResNet-50 (224)") or base.get("ResNet-50+3D (28)")
        best_name, best = max(base.items(), key=lambda kv: kv[1][0]) if base else ("-", None)
        clinical = _fmt(test["accuracy"]) if "threshold" in m else "(argmax)"
        lines.append(
            f"| {cfg.data.name} | {Path(c).name} | {_fmt(test['auc'])} | {_fmt(test['medmnist_acc'])} | {clinical} "
            f"| {wall / 60:.1f} min | {r18[0]:.3f} / {r18[1]:.3f} | {r50[0]:.3f} / {r50[1]:.3f} "
            f"| {best[0]:.3f} / {best[1]:.3f} ({best_name}) | {test['auc']['value'] / r18[0]:.3f} "
            f"| {test['medmnist_acc']['value'] / r18[1]:.3f} |")
        print(lines[-1], flush=True)
    return lines


def run_throughput(n: int = 2048, batch: int = 128) -> list[str]:
    import numpy as np
    import torch
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandScaleIntensity
    from torch.utils.data import DataLoader, TensorDataset

    from medlens.config import AugmentConfig
    from medlens.data.medmnist import load_medmnist
    from medlens.transforms.augment import BatchAugment

    x = torch.from_numpy(load_medmnist("pneumoniamnist").train.images[:n]).float() / 255
    aug = BatchAugment(AugmentConfig(hflip=0.5, rotate=10, translate=0.08, scale=0.1, brightness=0.1,
                                     contrast=0.1))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        aug(x[i:i + batch], g)
    ours = n / (time.perf_counter() - t0)

    monai_tf = Compose([RandFlip(prob=0.5, spatial_axis=1),
                        RandAffine(prob=1.0, rotate_range=np.deg2rad(10), translate_range=(2.2, 2.2),
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
    return ["| augmentation pipeline (PneumoniaMNIST 28 px, 2 CPU threads) | images/s | ratio |", "|---|---|---|",
            f"| medlens BatchAugment (whole batch as tensors) | {ours:,.0f} | {ours / ref:.1f}x |",
            f"| MONAI per-sample Compose + DataLoader collate | {ref:,.0f} | 1.0x |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=DEFAULT)
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--throughput-only", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    tables = []
    if not args.throughput_only:
        print("Accuracy against the MedMNIST v2 paper (Yang et al. 2023, Table 3), trained now on this machine:")
        tables.append("\n".join(run_accuracy(args.configs, Path(args.out))))
    tables.append("\n".join(run_throughput()))
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
