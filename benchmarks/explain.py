"""Explanation benchmark: faithfulness of every method against a random map, and its cost.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/explain.py [--run runs/benchmarks/pneumoniamnist_cnn] [--n 200]

If the run folder does not exist, the shipped PneumoniaMNIST config is trained into it first.
For each method, over ``--n`` test images (the model's predicted class explained): deletion AUC
(lower is better) and insertion AUC (higher is better) beside the random map's, the model-parameter
randomisation check (Spearman rank correlation and SSIM between maps of the trained and of a
re-initialised model: low is good), and seconds per image on this machine.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "benchmarks" / "pneumoniamnist_cnn"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--methods", default=None)
    args = ap.parse_args()
    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    from medlens.config import load_config
    from medlens.workflow.train import train
    from medlens.explain.run import evaluate_faithfulness

    run = Path(args.run)
    if not (run / "model.pt").exists():
        print(f"training {run} first ...", flush=True)
        train(load_config(REPO / "configs" / "pneumoniamnist_cnn.yaml"), run_dir=run, overwrite=True,
              progress_bar=False, log=lambda s: None)
    rows = evaluate_faithfulness(run, args.methods.split(",") if args.methods else None, n=args.n)
    print(f"Faithfulness on {rows[0]['n']} test images of {run.name} (predicted class explained)\n")
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
