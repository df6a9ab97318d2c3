"""``medlens federate``: federated learning with Flower, ending in an ordinary run folder.

The server side holds the global model and Flower's strategy (FedAvg, FedProx or FedAdam, unchanged);
sites train on their own data (``engine.federated.SiteClient``) and send back only weights. Two ways to run:

- **simulation** (``federate``): one machine, ``--sites`` clients partitioned from one dataset
  (``data.partition``), run by Flower's simulation engine (Ray);
- **deployment** (``serve_federation`` / ``join_federation``): ``medlens federate server`` and
  ``medlens federate client`` as separate processes over Flower's gRPC transport (TLS optional).

Either way the global model then goes through the same chain as ``medlens train`` (``finish_classifier``):
calibration and threshold on validation, test metrics with bootstrap CIs, report. The server's validation
split is used for the round-by-round global evaluation and the threshold; test labels only for the final
evaluation. Bytes sent per round are measured from the serialized weights Flower carries. Rounds where
sites failed (a client died, or sent nothing) are counted, and the report says so.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medlens.errors import ConfigError, MedlensError, MedlensWarning
from medlens.run import RunFolder, run_lock
from medlens.utils import seed_everything, write_json_atomic

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def _strategy_class(name: str):
    from flwr.server.strategy import FedAdam, FedAvg, FedProx

    if name not in STRATEGIES:
        raise ConfigError(f"--strategy '{name}' is not one of {', '.join(STRATEGIES)}")
    return {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[name]


def make_strategy(name: str, weights: list[np.ndarray], n_clients: int, signature: str, local_epochs: int,
                  evaluate_fn: Callable | None, min_fit_clients: int | None = None, proximal_mu: float = 0.01,
                  server_lr: float = 0.01):
    """Flower's strategy ``name``, recording per round the bytes sent each way, results and failures."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    base = _strategy_class(name)

    class Recording(base):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.rounds: dict[int, dict] = {}
            self.final: list[np.ndarray] | None = None
            self.initial_val_auc = None

        def _row(self, rnd: int) -> dict:
            return self.rounds.setdefault(rnd, {"round": rnd, "bytes_down": 0, "bytes_up": 0, "fit_results": 0,
                                                "fit_failures": 0, "sites": {}})

        def configure_fit(self, server_round, parameters, client_manager):
            # every site joins before the first round; later rounds go on with at least min_fit_clients (a site
            # that died is not waited for)
            self.min_available_clients = n_clients if server_round == 1 else need
            if server_round == 1:  # Flower sizes the sample before it waits: wait here, then all are sampled
                client_manager.wait_for(n_clients)
            todo = super().configure_fit(server_round, parameters, client_manager)
            size = sum(len(t) for t in parameters.tensors)
            for _, ins in todo:
                ins.config.update({"model_signature": signature, "local_epochs": local_epochs,
                                   "server_round": server_round})
            self._row(server_round)["bytes_down"] += size * len(todo)
            return todo

        def aggregate_fit(self, server_round, results, failures):
            row = self._row(server_round)
            row["fit_results"], row["fit_failures"] = len(results), len(failures)
            row["bytes_up"] += sum(len(t) for _, r in results for t in r.parameters.tensors)
            for _, r in results:
                site = str(r.metrics.get("site", "?"))
                row["sites"].setdefault(site, {}).update({"train_loss": r.metrics.get("train_loss"),
                                                          "missing_classes": r.metrics.get("missing_classes", 0)})
                if "epsilon" in r.metrics:
                    row["sites"][site]["epsilon"] = r.metrics["epsilon"]
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is not None:
                self.final = parameters_to_ndarrays(params)
            return params, metrics

        def configure_evaluate(self, server_round, parameters, client_manager):
            self.min_available_clients = need
            todo = super().configure_evaluate(server_round, parameters, client_manager)
            for _, ins in todo:
                ins.config.update({"model_signature": signature, "server_round": server_round})
            self._row(server_round)["bytes_down"] += sum(len(t) for t in parameters.tensors) * len(todo)
            return todo

        def aggregate_evaluate(self, server_round, results, failures):
            row = self._row(server_round)
            for _, r in results:
                site = str(r.metrics.get("site", "?"))
                row["sites"].setdefault(site, {})["val_auc"] = r.metrics.get("val_auc")
            row["evaluate_failures"] = len(failures)
            return super().aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round, parameters):
            out = super().evaluate(server_round, parameters)
            if out is not None and server_round == 0:
                self.initial_val_auc = out[1].get("val_auc")  # the untrained global model
            elif out is not None:
                self._row(server_round)["global_val_auc"] = out[1].get("val_auc")
            return out

    need = n_clients if min_fit_clients is None else min_fit_clients
    kw = dict(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=need, min_evaluate_clients=need,
              min_available_clients=n_clients, evaluate_fn=evaluate_fn, accept_failures=True,
              initial_parameters=ndarrays_to_parameters(weights))
    if name == "fedprox":
        kw["proximal_mu"] = proximal_mu
    if name == "fedadam":
        kw.update(eta=server_lr, eta_l=server_lr, tau=1e-3)
    return Recording(**kw)


class _Global:
    """The server's model and its data: builds the run contract, evaluates each round, finishes the run."""

    def __init__(self, cfg, data, path: Path) -> None:
        from medlens.engine.federated import model_signature
        from medlens.engine.train import build_network
        from medlens.workflow.train import classifier_meta

        self.cfg, self.data, self.path = cfg, data, path
        self.meta = classifier_meta(cfg, data)
        tr = data.train
        torch.manual_seed(cfg.seed)
        m = self.meta
        self.net = build_network(m.model, m.in_channels, m.n_outputs, tr.spatial_dims, m.input_size,
                                 m.model_params, m.preprocessing.mean, m.preprocessing.std)
        self.signature = model_signature(m.model_dump(mode="json"))

    def evaluate_fn(self, server_round, weights, config):
        from medlens.engine.federated import predict, set_weights
        from medlens.engine.module import validation_scores

        set_weights(self.net, weights)
        prob = predict(self.net, self.data.val, self.data.task)
        s = validation_scores(self.data.task, torch.as_tensor(prob), torch.as_tensor(np.asarray(self.data.val.labels)))
        return float(1.0 - s["val_auc"]), {"val_auc": s["val_auc"]}

    def finish(self, strategy, info: dict, site_tests: dict | None, t0: float) -> Path:
        """The global model of the last completed round -> the same run chain as ``medlens train``."""
        import pandas as pd

        from medlens.engine.federated import set_weights
        from medlens.engine.train import environment
        from medlens.evaluation.metrics import compute_metrics
        from medlens.report.html import write_report
        from medlens.run import Predictor
        from medlens.run.profile import profile_of
        from medlens.run.sections import write_section
        from medlens.utils import atomic_path
        from medlens.workflow.train import _write_start, finish_classifier

        if strategy.final is None:
            raise MedlensError("no federated round completed (every site failed or none connected)", self.path)
        set_weights(self.net, strategy.final)
        rounds = [strategy.rounds[k] for k in sorted(strategy.rounds)]
        failed = [r["round"] for r in rounds if r["fit_failures"] or r.get("evaluate_failures")]
        eps = [v["epsilon"] for r in rounds for v in r["sites"].values() if "epsilon" in v]
        summary = {**info, "rounds_run": len(rounds), "initial_val_auc": strategy.initial_val_auc, "rounds_with_failures": failed,
                   "megabytes_sent": round(sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / 1e6, 3)}
        if info.get("dp"):
            summary["dp"] = {**info["dp"], "epsilon": max(eps) if eps else None}
        self.meta.input_profile = profile_of(self.data, self.cfg.data)
        _write_start(self.cfg, self.meta, self.path)
        with atomic_path(self.path / "model.pt") as tmp:
            torch.save(self.net.state_dict(), tmp)
        with atomic_path(self.path / "history.csv") as tmp:
            pd.DataFrame([{"epoch": r["round"] - 1, "val_auc": r.get("global_val_auc"),
                           "train_loss": float(np.mean([v["train_loss"] for v in r["sites"].values()
                                                        if v.get("train_loss") is not None] or [np.nan]))}
                          for r in rounds]).to_csv(tmp, index=False)
        last = rounds[-1].get("global_val_auc")
        meta = self.meta.model_copy(update={
            "train_seconds": round(time.time() - t0, 1), "epochs_run": len(rounds),
            "best_epoch_metric": {"val_auc": last}, "environment": environment() | {"federated": summary}})
        run = finish_classifier(self.cfg, meta, self.path, self.data, self.net.eval())
        ev = self.cfg.evaluation
        per_site = []
        thr = run.meta.threshold.value if run.meta.threshold is not None else None
        predictor = Predictor(run)
        for site, ds in (site_tests or {}).items():
            row = {"site": site, "n_test": len(ds)}
            if len(ds) and len(np.unique(np.asarray(ds.labels))) > 1:
                m = compute_metrics(run.meta.task, ds.labels, predictor.predict_dataset(ds), thr, ev.bootstrap,
                                    ev.ci, self.cfg.seed)["metrics"]
                row["auc"] = m["auc"]
            per_site.append(row)
        summary["per_site_test"] = per_site
        summary["rounds"] = rounds
        write_json_atomic(self.path / "federated.json", summary)
        write_section(self.path, "federated", "Federated training", summary)
        write_report(run)
        return run.dir


def _site_datasets(data, n_sites: int, spec: str, seed: int):
    """(train, val, test) of each site, partitioned by the same rule; warns about sites lacking a class."""
    from medlens.data.partition import partition

    out = []
    for split in ("train", "val", "test"):
        ds = data.get(split)
        out.append([ds.subset(idx, name=f"site{k}/{split}") for k, idx in enumerate(partition(ds, n_sites, spec,
                                                                                             seed))])
    return list(zip(*out))


def _dp(dp_noise: float | None, dp_clip: float, dp_delta: float) -> dict | None:
    return None if dp_noise is None else {"noise_multiplier": dp_noise, "max_grad_norm": dp_clip, "delta": dp_delta}


def federate(cfg, *, sites: int = 5, rounds: int = 5, partition: str = "iid", strategy: str = "fedavg",
             local_epochs: int = 1, dp_noise: float | None = None, dp_clip: float = 1.0, dp_delta: float = 1e-5,
             run_dir: str | Path | None = None, overwrite: bool = False, cpus_per_site: float = 1.0,
             log: Callable[[str], None] = print) -> Path:
    """Simulate ``sites`` hospitals with Flower's simulation engine; write a run folder."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    from medlens.engine.federated import SiteClient, get_weights
    from medlens.transforms.preprocess import prepared_data
    from medlens.workflow.train import resolve_run_dir

    from medlens.data.partition import parse_partition

    _strategy_class(strategy)
    parse_partition(partition)
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1, not {sites}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, not {rounds}")
    path = resolve_run_dir(cfg, run_dir)
    folder = RunFolder(path)
    folder.check(False, overwrite)
    t0 = time.time()
    with run_lock(path):
        folder.prepare(False, overwrite)
        seed_everything(cfg.seed)
        data = prepared_data(cfg.data, seed=cfg.seed)
        if not len(data.train) or not len(data.val) or not len(data.test):
            raise MedlensError(f"empty split: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
        g = _Global(cfg, data, path)
        parts = _site_datasets(data, sites, partition, cfg.seed)
        n_classes = max(len(data.class_names), 2)
        lacking = 0
        empty = [k for k, (tr, _, _) in enumerate(parts) if len(tr) == 0]
        if empty:  # such a site takes part with weight 0 (FedAvg weighs sites by their training cases)
            warnings.warn(f"site(s) {empty} get no training data under --partition {partition}", MedlensWarning,
                          stacklevel=2)
        weights = get_weights(g.net)
        privacy = _dp(dp_noise, dp_clip, dp_delta)
        net_bytes = weights

        def client_fn(context):
            import copy

            k = int(context.node_config["partition-id"])
            tr, va, _ = parts[k]
            net = copy.deepcopy(g.net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MedlensWarning)
                c = SiteClient(f"site{k}", net, tr, va, cfg.train, data.task, n_classes, cfg.seed, g.signature,
                               local_epochs, privacy)
            return c.to_client()

        for k, (tr, _, _) in enumerate(parts):
            from medlens.engine.federated import missing_classes

            miss = missing_classes(tr, n_classes) if data.task != "multilabel" else []
            if miss:
                lacking += 1
                warnings.warn(f"site{k} has no training sample of class(es) {miss}", MedlensWarning, stacklevel=2)
        strat = make_strategy(strategy, net_bytes, sites, g.signature, local_epochs, g.evaluate_fn)

        def server_fn(context):
            return ServerAppComponents(strategy=strat, config=ServerConfig(num_rounds=rounds))

        log(f"federated: {sites} sites ({partition}), {strategy}, {rounds} rounds")
        run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn), num_supernodes=sites,
                       backend_config={"client_resources": {"num_cpus": cpus_per_site}}, verbose_logging=False)
        info = {"mode": "simulation", "engine": "flwr", "strategy": strategy, "sites": sites, "partition": partition,
                "local_epochs": local_epochs, "sites_missing_a_class": lacking, "sites_without_training_data": empty,
                "site_sizes": [len(p[0]) for p in parts], "dp": privacy}
        return g.finish(strat, info, {f"site{k}": p[2] for k, p in enumerate(parts)}, t0)


def serve_federation(cfg, *, clients: int, rounds: int, address: str, strategy: str = "fedavg",
                     local_epochs: int = 1, min_fit_clients: int | None = None, round_timeout: float | None = None,
                     certificates: tuple[Path, Path, Path] | None = None, run_dir: str | Path | None = None,
                     overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """The server process: waits for ``clients`` sites on ``address`` (gRPC), runs ``rounds`` rounds,
    evaluates the global model on its own validation/test data and writes the run folder."""
    from flwr.server import ServerConfig, start_server

    from medlens.engine.federated import get_weights
    from medlens.transforms.preprocess import prepared_data
    from medlens.workflow.train import resolve_run_dir

    _strategy_class(strategy)
    path = resolve_run_dir(cfg, run_dir)
    folder = RunFolder(path)
    folder.check(False, overwrite)
    t0 = time.time()
    certs = tuple(Path(p).read_bytes() for p in certificates) if certificates else None
    with run_lock(path):
        folder.prepare(False, overwrite)
        seed_everything(cfg.seed)
        data = prepared_data(cfg.data, seed=cfg.seed)
        g = _Global(cfg, data, path)
        strat = make_strategy(strategy, get_weights(g.net), clients, g.signature, local_epochs, g.evaluate_fn,
                              min_fit_clients=min_fit_clients)
        log(f"federated server on {address}: waiting for {clients} sites, {rounds} rounds ({strategy})")
        start_server(server_address=address, strategy=strat, certificates=certs,
                     config=ServerConfig(num_rounds=rounds, round_timeout=round_timeout))
        info = {"mode": "deployment", "engine": "flwr (gRPC)", "strategy": strategy, "sites": clients,
                "min_fit_clients": min_fit_clients or clients, "local_epochs": local_epochs, "tls": bool(certs),
                "dp": None}
        return g.finish(strat, info, None, t0)


def join_federation(cfg, *, site_data: Path, server: str, local_epochs: int = 1, root_certificate: Path | None = None,
                    dp_noise: float | None = None, dp_clip: float = 1.0, dp_delta: float = 1e-5,
                    config_file: str = "", site: str | None = None) -> None:
    """The client process of one site: its data (``--site-data``, a MedMNIST-layout .npz) stays here."""
    from flwr.client import start_client

    from medlens.engine.federated import SiteClient
    from medlens.transforms.preprocess import prepared_data

    site_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(site_data),
                                                                           "check_md5": False})})
    seed_everything(cfg.seed)
    data = prepared_data(site_cfg.data, seed=cfg.seed)
    g = _Global(site_cfg, data, Path("."))
    client = SiteClient(site or Path(site_data).stem, g.net, data.train, data.val, cfg.train, data.task,
                        max(len(data.class_names), 2), cfg.seed, g.signature, local_epochs,
                        _dp(dp_noise, dp_clip, dp_delta), config_file)
    root = Path(root_certificate).read_bytes() if root_certificate else None
    start_client(server_address=server, client=client.to_client(), insecure=root is None, root_certificates=root)
