"""Low-label benchmark: self-supervised pretraining (SimCLR or masked image modelling) against training from scratch.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/pretrain.py --threads 2
    .venv/bin/python benchmarks/pretrain.py --method mae --finetune pneumoniamnist retinamnist
    .venv/bin/python benchmarks/pretrain.py --quick                                # smoke run only

1. One backbone is pretrained without labels (``medlens.workflow.pretrain``) on the pooled **training** images
   of the 2D MedMNIST datasets on disk (``--pool``; validation and test images are never read).
2. For each fine-tuning dataset (``--finetune``) and label fraction (``--fractions``: ``data.label_fraction``,
   a stratified seeded share of the training labels; validation and test untouched), its shipped config
   (``configs/<dataset>_cnn.yaml``) is trained twice with the same seed: from scratch, and from the backbone
   (``model.pretrained``, all layers fine-tuned). Epochs: ``--epochs`` at 100 % of the labels, raised for
   smaller fractions so that each run takes at least ``--min-steps`` optimiser steps (capped at ``--max-epochs``).
3. The table prints, on the official test split, each run's AUC with its 95 % bootstrap CI (from the run's own
   evaluation), the paired difference pretrained - scratch on the same test cases (``evaluation.compare``:
   DeLong by Sun & Xu for binary tasks, paired bootstrap otherwise), and wall times. The measured difference
   is printed whatever its sign.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, set_threads

POOL = ["pneumoniamnist", "retinamnist"]


def _fmt(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _present(names: list[str]) -> list[str]:
    from medlens.data.medmnist import medmnist_path

    return [n for n in names if medmnist_path(n).exists()]


def _epochs(n_train: int, fraction: float, batch: int, full: int, min_steps: int, cap: int) -> int:
    n = max(1, math.ceil(fraction * n_train))
    steps = max(1, math.ceil(n / batch))
    return int(min(cap, max(full, math.ceil(min_steps / steps))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="simclr", choices=["simclr", "mae"])
    ap.add_argument("--pool", nargs="*", default=POOL, help="datasets whose training images are pooled")
    ap.add_argument("--finetune", nargs="*", default=["pneumoniamnist"], help="datasets fine-tuned and compared")
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--pretrain-batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning / scratch epochs at 100%% of the labels")
    ap.add_argument("--min-steps", type=int, default=80, help="fewer labels: at least this many steps per run")
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "pretrain"))
    add_common_args(ap)
    args = ap.parse_args()
    quick_banner(args.quick, "a few hundred images, one epoch")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from medlens.config import load_config
    from medlens.data.catalog import get_info
    from medlens.evaluation.compare import compare_runs
    from medlens.workflow.pretrain import pretrain
    from medlens.workflow.train import train

    threads = set_threads(args.threads)
    out = Path(args.out + ("-quick" if args.quick else ""))
    pool = _present(args.pool)
    if not pool:
        raise SystemExit(f"none of {args.pool} is on disk (MEDLENS_DATA)")
    finetune = _present(args.finetune)
    t_all = time.time()

    # 1. the backbone
    first = load_config(REPO / "configs" / f"{finetune[0]}_cnn.yaml")
    model, model_params = first.model.name, dict(first.model.params)
    bb = out / f"backbone_{args.method}.pt"
    p_epochs = 1 if args.quick else args.pretrain_epochs
    t0 = time.time()
    meta = pretrain(pool, method=args.method, model=model, params=model_params, size=28, channels=1,
                    epochs=p_epochs, batch_size=args.pretrain_batch, seed=args.seed,
                    max_per_dataset=200 if args.quick else None, out=bb, precision="bf16")
    t_pre = time.time() - t0
    per = ", ".join(f"{d['name']} {d['n_images']}" for d in meta["datasets"])
    print(f"Pretraining: {args.method}, {model} {json.dumps(model_params)}, {meta['n_images']} unlabelled images "
          f"from the train splits only ({per}; gray, 28 px; validation and test images not used), "
          f"{p_epochs} epochs of batch {args.pretrain_batch}, loss {meta['loss_curve'][0]:.3f} -> "
          f"{meta['loss_curve'][-1]:.3f}, {t_pre / 60:.1f} min, {threads} torch threads.\n", flush=True)

    # 2. scratch against pretrained, same config and seed
    rows = []
    for ds in finetune:
        base = load_config(REPO / "configs" / f"{ds}_cnn.yaml")
        n_train = get_info(ds).n_samples["train"]
        for frac in args.fractions:
            cfg = for_benchmark(base, threads, args.quick)
            cfg.seed = args.seed
            cfg.data.color = "gray"   # the backbone's channel count (RetinaMNIST: luminance)
            cfg.data.label_fraction = frac
            cfg.train.warmup_epochs = 0
            if not args.quick:
                cfg.train.epochs = _epochs(n_train, frac, cfg.train.batch_size, args.epochs, args.min_steps,
                                           args.max_epochs)
            runs, walls = {}, {}
            for arm in ("scratch", "pretrained"):
                c = cfg.model_copy(deep=True)
                c.name = f"{ds}_{int(round(frac * 1000)):04d}_{arm}_{args.method}"
                if arm == "pretrained":
                    c.model.pretrained, c.model.freeze = str(bb), []
                t0 = time.time()
                runs[arm] = train(c, run_dir=out / c.name, overwrite=True, progress_bar=False, log=lambda s: None)
                walls[arm] = time.time() - t0
            rj = json.loads((runs["pretrained"] / "run.json").read_text())
            m = {a: json.loads((r / "metrics.json").read_text())["test"] for a, r in runs.items()}
            cmp = compare_runs([runs["pretrained"], runs["scratch"]], n_boot=cfg.evaluation.bootstrap,
                               seed=args.seed)
            pair = cmp["pairs"][0]
            if "delong" in pair:
                d = pair["delong"]
                diff = (f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                        f"(DeLong p={d['p_value']:.3g})")
            else:
                d = pair["differences"]["auc"]
                diff = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (paired bootstrap)"
            n_lab = json.loads((runs["scratch"] / "run.json").read_text())["n_samples"]["train"]
            rows.append(f"| {ds} | {frac:g} | {n_lab} | {cfg.train.epochs} | {_fmt(m['scratch']['metrics']['auc'])} "
                        f"| {_fmt(m['pretrained']['metrics']['auc'])} | {diff} | {cmp['n']} "
                        f"| {rj['transfer']['loaded']} | {walls['scratch']:.0f} s | {walls['pretrained']:.0f} s |")
            print(rows[-1], flush=True)

    print()
    print(f"Low-label transfer, {args.method} backbone ({p_epochs} pretraining epochs, {t_pre / 60:.1f} min) against "
          f"scratch; configs/<dataset>_cnn.yaml, gray, seed {args.seed}, fine-tuning epochs {args.epochs} at 100% "
          f"labels, raised to >= {args.min_steps} steps (max {args.max_epochs}) for fewer labels; "
          f"{threads} torch threads; test AUC [95% CI] on the official test split:")
    print("| dataset | label fraction | labelled train n | epochs | scratch AUC | pretrained AUC "
          "| difference pretrained - scratch [95% CI] | test n | tensors loaded | wall scratch | wall pretrained |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nTotal wall time {(time.time() - t_all) / 60:.1f} min (pretraining included).")


if __name__ == "__main__":
    main()
