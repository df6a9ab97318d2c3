"""Federated benchmark: PneumoniaMNIST and RetinaMNIST split into 5 sites.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/federated.py
    .venv/bin/python benchmarks/federated.py --quick          # smoke run: tiny data, 1 round

For each dataset, on the official test split (95% bootstrap CIs of the test AUC):
- centralised: ``medlens train`` on the pooled training data, ``--epochs`` epochs;
- federated (Flower's simulation engine, FedAvg, ``--rounds`` rounds of 1 local epoch) with the sites drawn
  IID, Dirichlet(0.5) and Dirichlet(0.1) over the labels;
- each IID site alone: the same network trained only on that site's training data for ``--epochs`` epochs
  (the engine's local step), evaluated on the same official test split.
Wall time is each row's, on this machine; MB sent counts the weights Flower carried both ways (0 for the
rows that move no weights; the centralised row moved the images instead).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import add_common_args, set_threads

DATASETS = {"pneumoniamnist": {"color": "gray"}, "retinamnist": {"color": "rgb"}}


def _cfg(name: str, out: Path, epochs: int, quick: bool, threads: int):
    from medlens.config import config_from_dict

    data = {"source": "medmnist", "name": name, "size": 28}
    if quick:
        data["max_samples"] = 300
    return config_from_dict({
        "name": name, "seed": 0, "output_dir": str(out), "data": data,
        "model": {"name": "small_cnn", "params": {"widths": [16, 32, 64], "dropout": 0.1}},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.002, "precision": "32", "num_threads": threads,
                  "augment": {"rotate": 10, "translate": 0.05}},
        "evaluation": {"bootstrap": 200 if quick else 1000}})


def _auc(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]["metrics"]["auc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5, help="centralised and site-alone epochs")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    add_common_args(ap)
    a = ap.parse_args()
    threads = set_threads(a.threads)
    rounds, epochs = (1, 1) if a.quick else (a.rounds, a.epochs)
    import warnings

    from medlens.engine.federated import local_fit, predict
    from medlens.evaluation.metrics import compute_metrics
    from medlens.workflow.federate import _Global, _site_datasets, federate
    from medlens.transforms.preprocess import prepared_data
    from medlens.workflow.train import train

    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for ds_name in a.datasets:
            cfg = _cfg(ds_name, out, epochs, a.quick, threads)
            t = time.time()
            run = train(cfg, run_dir=out / f"{ds_name}_central", progress_bar=False, log=lambda s: None)
            rows.append((ds_name, "centralised", _auc(run), time.time() - t, 0.0))
            for spec in ("iid", "dirichlet:0.5", "dirichlet:0.1"):
                t = time.time()
                run = federate(cfg, sites=a.sites, rounds=rounds, partition=spec,
                               run_dir=out / f"{ds_name}_{spec.replace(':', '')}", log=lambda s: None)
                fed = json.loads((run / "federated.json").read_text())
                rows.append((ds_name, f"federated {spec} (FedAvg, {rounds} rounds)", _auc(run), time.time() - t,
                             fed["megabytes_sent"]))
            data = prepared_data(cfg.data, seed=cfg.seed)
            g = _Global(cfg, data, out)
            for k, (tr, _, _) in enumerate(_site_datasets(data, a.sites, "iid", cfg.seed)):
                import copy

                t = time.time()
                net = copy.deepcopy(g.net)
                for e in range(epochs):
                    local_fit(net, tr, cfg.train, data.task, cfg.seed, e, 1)
                prob = predict(net, data.test, data.task)
                m = compute_metrics(data.task, data.test.labels, prob, 0.5 if data.task == "binary" else None,
                                    cfg.evaluation.bootstrap, cfg.evaluation.ci, cfg.seed)["metrics"]["auc"]
                rows.append((ds_name, f"site {k} alone (n={len(tr)}, {epochs} epochs)", m, time.time() - t, 0.0))
    print(f"\nFederated benchmark ({a.sites} sites, small_cnn 16/32/64, torch threads {threads}"
          f"{', QUICK smoke run: figures meaningless' if a.quick else ''})")
    print(f"{'dataset':<15} {'setting':<44} {'test AUC':>8} {'95% CI':>15} {'wall s':>7} {'MB sent':>8}")
    for ds_name, setting, auc, secs, mb in rows:
        print(f"{ds_name:<15} {setting:<44} {auc['value']:>8.3f} {auc['ci_low']:>7.3f}-{auc['ci_high']:<7.3f} "
              f"{secs:>7.1f} {mb:>8.2f}")


if __name__ == "__main__":
    main()
