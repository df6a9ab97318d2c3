"""Self-configuring runs (issue 17): `medlens train --auto` against the hand configs and the published rows.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/auto.py                  # every MedMNIST file on disk
    .venv/bin/python benchmarks/auto.py --datasets retinamnist --threads 2
    .venv/bin/python benchmarks/auto.py --hand-runs runs/benchmarks                  # re-evaluate hand runs
    .venv/bin/python benchmarks/auto.py --quick                                      # smoke run only

For each MedMNIST dataset whose 28 px file is on disk, `medlens train --auto FILE --budget B` runs as its own
process (B: 15 min for 2D, 30 min for 3D, the issue's budgets; the wall time printed is the whole command's,
imports, planning, fitting, evaluation and report included). Beside it: the dataset's hand config
(`src/medlens/configs/<dataset>_cnn.yaml`), trained in this run, or with `--hand-runs DIR` its existing run
folder `DIR/<config name>` re-evaluated (labelled so, with the folder's provenance); the MedMNIST v2 rows
(ResNet-18 at 28 px and the best of all baselines) and MedMNIST+'s best at 28 px, published figures with their
sources printed under the table (`benchmarks/baselines.py`). ACC is the MedMNIST evaluator's (0.5 / argmax,
`medmnist_acc`), AUC the test ROC AUC (macro one-vs-rest for multi-class), both with 95% bootstrap CIs. The
last columns compare the planned run with issue 17's target and say by how much it was met or missed. The closing
notes give, for every planned row, the plan's estimated wall time (``plan.estimates.total_s`` plus the 10 s
start-up) against the measured one and both as shares of the budget (issue 30 item 3: 90-105%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, run_provenance

from medlens.engine.planner import STARTUP_S

BUDGETS = {2: "15m", 3: "30m"}
QUICK_BUDGETS = {2: "150s", 3: "240s"}
QUICK_SETS = ["data.max_samples=256", "evaluation.bootstrap=50"]


def _fmt(m: dict | None) -> str:
    return f"{m['value']:.3f} [{m['ci_low']:.3f}-{m['ci_high']:.3f}]" if m else "-"


def datasets_on_disk() -> list[str]:
    from medlens.data.catalog import MEDMNIST
    from medlens.data.medmnist import medmnist_path

    return [n for n in MEDMNIST if medmnist_path(n, 28).exists()]


def run_auto(name: str, out: Path, threads: int, quick: bool) -> dict:
    """`medlens train --auto` of the dataset's 28 px file as a separate process; its wall time and metrics."""
    from medlens.data.catalog import get_info
    from medlens.data.medmnist import medmnist_path

    info = get_info(name)
    budget = (QUICK_BUDGETS if quick else BUDGETS)[info.dims]
    run_dir = out / (f"auto-{name}" + ("-quick" if quick else ""))
    sets = [f"train.num_threads={threads}"] + (QUICK_SETS if quick else [])
    cmd = [sys.executable, "-m", "medlens.cli.main", "train", "--auto", str(medmnist_path(name, 28)), "--budget",
           budget, "--run-dir", str(run_dir), "--overwrite", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.time() - t0
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1], "wall": wall, "budget": budget}
    m = json.loads((run_dir / "metrics.json").read_text())
    plan_file = run_dir.parent / f"{run_dir.name}.plan.yaml"
    import yaml

    plan = yaml.safe_load(plan_file.read_text())["plan"]
    by = {d["setting"]: d["value"] for d in plan["decisions"]}
    summary = (f"{by['model']['name']} {by['data.size']} px, {by['train.epochs']} ep x {by['train.ensemble']}, "
               f"{by['train.precision']}, EMA {by['train.ema']}, TTA {by['evaluation.tta']}")
    planned = float(plan["estimates"]["total_s"]) + STARTUP_S
    return {"metrics": m, "wall": wall, "budget": budget, "plan": summary, "plan_file": str(plan_file),
            "planned": planned, "budget_s": float(plan["budget_seconds"])}


def run_hand(name: str, out: Path, threads: int, quick: bool, hand_runs: Path | None) -> dict | None:
    from medlens.config import load_config

    path = REPO / "src" / "medlens" / "configs" / f"{name}_cnn.yaml"
    if not path.exists():
        return None
    cfg = load_config(path)
    if hand_runs is not None:   # re-evaluate an existing run folder of this config
        from medlens.evaluation.evaluate import evaluate_run
        from medlens.run import Run

        run_dir = hand_runs / cfg.name
        if not (run_dir / "run.json").exists():
            return {"error": f"no run folder {run_dir}", "label": f"{path.name} (re-evaluated)"}
        from medlens.errors import MedlensError

        try:
            evaluate_run(Run.open(run_dir), split="test")
        except MedlensError as e:   # e.g. a run written by an older medlens: say so, and go on
            return {"error": f"cannot re-evaluate: {str(e)[:200]}", "label": f"{path.name} (re-evaluated)"}
        m = json.loads((run_dir / "metrics.json").read_text())
        return {"metrics": m, "wall": None, "label": f"{path.name} (re-evaluated: {run_provenance(run_dir)})"}
    from medlens.workflow.train import train

    cfg = for_benchmark(cfg, threads, quick)
    t0 = time.time()
    run = train(cfg, run_dir=out / (cfg.name + ("-quick" if quick else "")), overwrite=True, progress_bar=False,
                log=lambda s: None)
    return {"metrics": json.loads((run / "metrics.json").read_text()), "wall": time.time() - t0,
            "label": f"{path.name} (trained now)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=None, help="default: every MedMNIST 28 px file on disk")
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks"))
    ap.add_argument("--hand-runs", type=Path, default=None,
                    help="re-evaluate existing hand-config run folders DIR/<config name> instead of training them")
    ap.add_argument("--no-hand", action="store_true", help="skip the hand configs")
    add_common_args(ap)
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from baselines import (AUTO_TARGETS, MEDMNIST_PLUS, REFERENCE_ROWS, baselines_for, medmnist_plus_for,
                           sources)

    quick_banner(args.quick, "capped splits (256 per split) and 150-240 s budgets")
    out = Path(args.out)
    names = args.datasets or datasets_on_disk()
    lines = ["| dataset | method | budget | wall time | test n | AUC [95% CI] | ACC [95% CI] | target AUC / ACC "
             "| target met (AUC, ACC margin) |", "|---|---|---|---|---|---|---|---|---|"]
    used, plus_used, notes = [], False, []
    for name in names:
        target = AUTO_TARGETS.get(name)
        a = run_auto(name, out, args.threads, args.quick)
        tgt = f"{target[0]:.3f} / {target[1]:.3f}" if target else "-"
        if "error" in a:
            lines.append(f"| {name} | train --auto | {a['budget']} | {a['wall'] / 60:.1f} min | - | - | - | {tgt} "
                         f"| failed: {a['error'][:300]} |")
        else:
            t = a["metrics"]["test"]
            auc, acc = t["metrics"]["auc"], t["metrics"]["medmnist_acc"]
            met = "-"
            if target:
                da, dc = auc["value"] - target[0], acc["value"] - target[1]
                met = f"{'yes' if da >= 0 and dc >= 0 else 'no'} ({da:+.3f}, {dc:+.3f})"
            lines.append(f"| {name} | train --auto ({a['plan']}) | {a['budget']} | {a['wall'] / 60:.1f} min "
                         f"| {t['n']} | {_fmt(auc)} | {_fmt(acc)} | {tgt} | {met} |")
            notes.append(f"{name}: planned {a['planned']:.0f} s ({a['planned'] / a['budget_s']:.0%} of {a['budget']}), "
                         f"actual {a['wall']:.0f} s ({a['wall'] / a['budget_s']:.0%}); plan {a['plan_file']}")
        print(lines[-1], flush=True)
        if not args.no_hand:
            h = run_hand(name, out, args.threads, args.quick, args.hand_runs)
            if h is not None and "error" not in h:
                t = h["metrics"]["test"]
                wall = f"{h['wall'] / 60:.1f} min" if h["wall"] is not None else "-"
                lines.append(f"| {name} | {h['label']} | - | {wall} | {t['n']} | {_fmt(t['metrics']['auc'])} "
                             f"| {_fmt(t['metrics']['medmnist_acc'])} | | |")
            elif h is not None:
                lines.append(f"| {name} | {h['label']} | - | - | - | - | - | | {h['error']} |")
            print(lines[-1], flush=True)
        base = baselines_for(name)
        if base:
            table = next(iter(base.values())).table
            r18 = base.get(REFERENCE_ROWS[table][0])
            best = max(base.values(), key=lambda b: b.auc)
            for b in dict.fromkeys(x for x in (r18, best) if x):
                used.append(b)
                lines.append(f"| {name} | MedMNIST v2 {b.row} (published) | - | - | - | {b.auc:.3f} | {b.acc:.3f} "
                             "| | |")
        plus = medmnist_plus_for(name)
        lines.append(f"| {name} | MedMNIST+ best at 28 px (published) | - | - | "
                     + (f"- | {plus.auc:.3f} | {plus.acc:.3f} | | |" if plus else
                        "- | - | - | | (not in MedMNIST+'s 2D table) |"))
        plus_used |= plus is not None
    print("\n" + "\n".join(lines))
    if used:
        print("\n" + sources(used))
    if plus_used:
        print(f"{MEDMNIST_PLUS}: best test AUC / ACC at 28 px of its 2D table (published, not measured here)")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
