"""Explanation benchmark: faithfulness of every method against a random map, and its cost.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/explain.py [--n 200] [--threads 2]
    .venv/bin/python benchmarks/explain.py --run runs/x/pneumoniamnist_cnn     # score an existing run
    .venv/bin/python benchmarks/explain.py --quick                             # smoke run

By default the shipped PneumoniaMNIST config is trained in this run (``train.num_threads =
--threads``) and its model explained; ``--run`` scores a finished run instead, named in the output
with its date and config hash. For each method, over ``--n`` test images (the model's predicted class
explained): deletion AUC (lower is better) and insertion AUC (higher is better) beside the random
map's, the model-parameter randomisation check (Spearman rank correlation and SSIM between maps of the
trained and of a re-initialised model: low is good), and seconds per image at the printed thread count.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, run_provenance, set_threads, torch_threads

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished classifier run to explain instead of training one now")
    ap.add_argument("--config", default="configs/pneumoniamnist_cnn.yaml", help="what to train when --run is absent")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--methods", default=None)
    add_common_args(ap)
    args = ap.parse_args()
    quick_banner(args.quick)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from medlens.config import load_config
    from medlens.explain.run import evaluate_faithfulness
    from medlens.run import Run

    if args.run is None:
        from medlens.workflow.train import train

        cfg = for_benchmark(load_config(REPO / args.config), args.threads, args.quick)
        t0 = time.time()
        run_dir = train(cfg, run_dir=args.out / f"explain_{cfg.name}{'-quick' if args.quick else ''}",
                        overwrite=True, progress_bar=False, log=lambda s: None)
        origin = (f"trained in this run from {args.config} ({(time.time() - t0) / 60:.1f} min, "
                  f"{torch_threads()} torch threads): {run_dir}")
    else:
        run_dir = args.run
        origin = f"read from run folder {run_provenance(run_dir)}"
    run = Run.open(run_dir, expect="classification")
    threads = set_threads(args.threads)
    n = min(args.n, 16) if args.quick else args.n
    rows = evaluate_faithfulness(run, args.methods.split(",") if args.methods else None, n=n)
    if not rows:
        raise SystemExit("no method applies to this run's inputs")
    print(f"Model: {origin}.")
    print(f"Faithfulness on {rows[0]['n']} test images of {run.name} (predicted class explained), "
          f"{threads} torch threads\n")
    print("| method | deletion AUC (lower better) | random | insertion AUC (higher better) | random "
          "| beats random on both | randomised-model Spearman | randomised-model SSIM | s / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        both = r["beats_random_deletion"] and r["beats_random_insertion"]
        print(f"| {r['method']} | {r['deletion_auc']:.3f} | {r['random_deletion_auc']:.3f} | {r['insertion_auc']:.3f} "
              f"| {r['random_insertion_auc']:.3f} | {'yes' if both else 'no'} | {r['randomisation_spearman']:.2f} "
              f"| {r['randomisation_ssim']:.2f} | {r['seconds_per_image']:.4f} |")


if __name__ == "__main__":
    main()
