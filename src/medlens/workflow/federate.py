"""``medlens federate``: federated learning with Flower, ending in an ordinary run folder.

The server side holds the global model and Flower's strategy (one registered in ``engine.strategies``:
FedAvg, FedProx, FedAdam); sites train on their own data (``engine.federated.SiteClient``) and send back only
weights. Two ways to run:

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

import copy
import hmac
import ipaddress
import math
import secrets
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, cast

import grpc
import numpy as np
import pandas as pd
import torch
from flwr.client import ClientApp, start_client
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerAppComponents, ServerConfig, start_server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from medlens.data import partition as partitioning
from medlens.engine.federated import (
    SiteClient,
    digest,
    eval_body,
    get_weights,
    missing_classes,
    model_signature,
    predict,
    result_tag,
    set_weights,
    update_problem,
)
from medlens.engine.module import validation_scores
from medlens.engine.strategies import StrategySettings, get_strategy
from medlens.engine.train import build_network, environment, seed_everything
from medlens.errors import ConfigError, MedlensError, MedlensWarning
from medlens.evaluation.metrics import compute_metrics
from medlens.run.profile import profile_of
from medlens.run.sections import write_section
from medlens.tasks import get_task
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.classifier import classifier_meta, finish_classifier
from medlens.workflow.lifecycle import RunStart, resolve_run_dir, save_weights, write_record, write_start, write_table


def _strategy_class(name: str, proximal_mu: float = 0.01, server_lr: float = 0.01) -> tuple[type, dict]:
    """The registered strategy ``name`` (``engine.strategies``): its Flower class (FedAvg or a subclass) and
    the keyword arguments it adds to FedAvg's; one line for an unknown name or a class of another family."""
    base, extra = get_strategy(name).build(StrategySettings(proximal_mu=proximal_mu, server_lr=server_lr))
    if not (isinstance(base, type) and issubclass(base, FedAvg)):
        raise ConfigError(f"--strategy '{name}' builds {getattr(base, '__name__', type(base).__name__)}, not a "
                          "Flower strategy of the FedAvg family (flwr.server.strategy.FedAvg or a subclass)")
    return base, dict(extra)


def _finite(v):
    """A number a site reported, kept only when it is a finite number (None otherwise)."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


#: the default bound on a site's step: ``||w_site - w_global|| <= factor * max(||w_global||, eps)``
UPDATE_NORM_FACTOR = 10.0
#: default seconds a round waits for the sites' answers (fit and evaluate each), and for the sites to join
ROUND_TIMEOUT = 3600.0
JOIN_TIMEOUT = 3600.0


def _bounded_client_manager(max_wait: float):
    """Flower's client manager, whose waits for sites (1 day in Flower) last at most ``max_wait`` seconds."""
    class Bounded(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            # Flower's own calls (sampling) use the 1-day default: they wait one round timeout at most
            # Flower annotates the timeout as int; it is a threading.Condition timeout, seconds as a float
            return super().wait_for(num_clients, timeout=cast(int, max_wait) if timeout == 86400 else timeout)

    return Bounded()


def make_strategy(name: str, weights: list[np.ndarray], n_clients: int, signature: str, local_epochs: int,
                  evaluate_fn: Callable | None, min_fit_clients: int | None = None, proximal_mu: float = 0.01,
                  server_lr: float = 0.01, update_norm_factor: float = UPDATE_NORM_FACTOR,
                  site_secrets: dict[str, bytes] | None = None, join_timeout: float | None = None,
                  log: Callable[[str], None] | None = None):
    """Flower's strategy ``name``, recording per round the bytes sent each way, results and failures.

    Every result is checked before Flower aggregates it: with ``site_secrets`` its HMAC tag (site, round, the
    round's nonce, a digest of the weights or scores); a fit result's weights against the global model
    (``engine.federated.update_problem``: arrays, dtypes, finite, norm bound ``update_norm_factor``). A refused
    result is dropped, counted (``fit_rejected`` / ``evaluate_rejected`` and the reason per site in the round's
    row) and logged; the round goes on with the others. A round with fewer than ``min_fit_clients`` accepted
    updates keeps the previous global model."""
    base, extra = _strategy_class(name, proximal_mu, server_lr)
    say = log or (lambda _s: None)

    class Recording(base):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.rounds: dict[int, dict] = {}
            self.final: list[np.ndarray] | None = None
            self.initial_val_auc = None
            self.current: list[np.ndarray] = weights
            self.nonces: dict[tuple[str, int], str] = {}

        def _row(self, rnd: int) -> dict:
            return self.rounds.setdefault(rnd, {"round": rnd, "bytes_down": 0, "bytes_up": 0, "fit_results": 0,
                                                "fit_failures": 0, "fit_rejected": 0, "sites": {}})

        def _nonce(self, kind: str, rnd: int) -> str:
            return self.nonces.setdefault((kind, rnd), secrets.token_hex(16))

        def _site(self, r, kind: str, rnd: int, body: str) -> tuple[str, str | None]:
            """(site name, why the result is refused or None): the HMAC check when sites have secrets."""
            site = r.metrics.get("site")
            site = site[:64] if isinstance(site, str) and site.isprintable() else "?"
            if site_secrets is None:
                return site, None
            key, tag = site_secrets.get(site), r.metrics.get("auth")
            if key is None or not isinstance(tag, str):
                return site, "not authenticated (unknown site or no tag)"
            want = result_tag(key, kind, site, rnd, self._nonce(kind, rnd), r.num_examples, body)
            if not hmac.compare_digest(want.encode(), tag.encode()[:128]):
                return site, "not authenticated (wrong tag)"
            return site, None

        def _reject(self, row: dict, kind: str, rnd: int, site: str, why: str) -> None:
            row[f"{kind}_rejected"] = row.get(f"{kind}_rejected", 0) + 1
            row.setdefault("rejected", []).append({"site": site, "step": kind, "reason": why})
            say(f"round {rnd}: {kind} result of site {site} dropped: {why}")

        def configure_fit(self, server_round, parameters, client_manager):
            # every site joins before the first round (at most join_timeout s); later rounds go on with at
            # least min_fit_clients (a site that died is not waited for beyond the round timeout)
            self.min_available_clients = n_clients if server_round == 1 else need
            if server_round == 1 and not client_manager.wait_for(n_clients, timeout=int(join_timeout or 86400)):
                say(f"only {client_manager.num_available()} of {n_clients} site(s) joined within "
                    f"{join_timeout} s")
                self.min_available_clients = min(need, max(client_manager.num_available(), 1))
            self.current = parameters_to_ndarrays(parameters)
            todo = super().configure_fit(server_round, parameters, client_manager)
            size = sum(len(t) for t in parameters.tensors)
            for _, ins in todo:
                ins.config.update({"model_signature": signature, "local_epochs": local_epochs,
                                   "server_round": server_round, "nonce": self._nonce("fit", server_round)})
            self._row(server_round)["bytes_down"] += size * len(todo)
            return todo

        def aggregate_fit(self, server_round, results, failures):
            row = self._row(server_round)
            row["fit_results"], row["fit_failures"] = len(results), len(failures)
            row["bytes_up"] += sum(len(t) for _, r in results for t in r.parameters.tensors)
            kept, seen = [], set()
            for proxy, r in results:
                unreadable = None
                try:
                    update = parameters_to_ndarrays(r.parameters)
                except Exception as e:  # noqa: BLE001 - bytes from the network that are not arrays
                    update, unreadable = None, f"unreadable weights ({type(e).__name__})"
                site, auth = self._site(r, "fit", server_round, digest(update) if update is not None else "")
                why = auth or unreadable
                if why is None and (isinstance(r.num_examples, bool) or r.num_examples < 0):
                    why = f"negative number of examples {r.num_examples}"
                if why is None and update is not None:   # an unreadable update has its reason already
                    why = update_problem(update, self.current, update_norm_factor)
                if why is None and site_secrets is not None and site in seen:
                    why = "this site already answered in this round"
                if why:
                    self._reject(row, "fit", server_round, site, why)
                    continue
                seen.add(site)
                kept.append((proxy, r))
                row["sites"].setdefault(site, {}).update({"train_loss": _finite(r.metrics.get("train_loss")),
                                                          "missing_classes": _finite(r.metrics.get("missing_classes",
                                                                                                   0))})
                if "epsilon" in r.metrics:
                    row["sites"][site]["epsilon"] = _finite(r.metrics["epsilon"])
            row["fit_accepted"] = len(kept)
            if len(kept) < need or not sum(r.num_examples for _, r in kept):
                row["skipped"] = (f"{len(kept)} valid update(s), {need} needed" if len(kept) < need else
                                  "the valid updates hold no training example") + ": the global model is kept"
                say(f"round {server_round}: {row['skipped']}")
                return None, {}
            params, metrics = super().aggregate_fit(server_round, kept, failures)
            if params is not None:
                self.final = parameters_to_ndarrays(params)
            return params, metrics

        def configure_evaluate(self, server_round, parameters, client_manager):
            self.min_available_clients = need
            todo = super().configure_evaluate(server_round, parameters, client_manager)
            for _, ins in todo:
                ins.config.update({"model_signature": signature, "server_round": server_round,
                                   "nonce": self._nonce("evaluate", server_round)})
            self._row(server_round)["bytes_down"] += sum(len(t) for t in parameters.tensors) * len(todo)
            return todo

        def aggregate_evaluate(self, server_round, results, failures):
            row = self._row(server_round)
            kept = []
            for proxy, r in results:
                auc = r.metrics.get("val_auc")
                try:
                    body = eval_body(r.loss, auc)
                except (TypeError, ValueError):
                    body = ""
                site, why = self._site(r, "evaluate", server_round, body)
                finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in
                             (r.loss, *(() if auc is None else (auc,))))
                if why is None and not finite:
                    why = "non-finite or non-numeric loss or score"
                if why is None and r.num_examples < 0:
                    why = f"negative number of examples {r.num_examples}"
                if why:
                    self._reject(row, "evaluate", server_round, site, why)
                    continue
                row["sites"].setdefault(site, {})["val_auc"] = auc
                if r.num_examples > 0:
                    kept.append((proxy, r))
            row["evaluate_failures"] = len(failures)
            if not kept:
                return None, {}
            return super().aggregate_evaluate(server_round, kept, failures)

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
    return Recording(**kw, **extra)


class _Global:
    """The server's model and its data: builds the run contract, evaluates each round, finishes the run."""

    def __init__(self, cfg, data, path: Path) -> None:
        self.cfg, self.data, self.path = cfg, data, path
        self.meta = classifier_meta(cfg, data)
        tr = data.train
        torch.manual_seed(cfg.seed)
        m = self.meta
        self.net = build_network(m.model, m.in_channels, m.n_outputs, tr.spatial_dims, m.input_size,
                                 m.model_params, m.preprocessing.mean, m.preprocessing.std)
        self.signature = model_signature(m.model_dump(mode="json"))

    def evaluate_fn(self, server_round, weights, config):
        set_weights(self.net, weights)
        prob = predict(self.net, self.data.val, self.data.task)
        s = validation_scores(self.data.task, torch.as_tensor(prob), torch.as_tensor(np.asarray(self.data.val.labels)))
        return float(1.0 - s["val_auc"]), {"val_auc": s["val_auc"]}

    def finish(self, strategy, info: dict, site_tests: dict | None, t0: float) -> Path:
        """The global model of the last completed round -> the same run chain as ``medlens train``."""
        if strategy.final is None:
            raise MedlensError("no federated round completed (every site failed or none connected)", self.path)
        set_weights(self.net, strategy.final)
        rounds = [strategy.rounds[k] for k in sorted(strategy.rounds)]
        failed = [r["round"] for r in rounds if r["fit_failures"] or r.get("evaluate_failures")
                  or r.get("fit_rejected") or r.get("evaluate_rejected")]
        eps = [v["epsilon"] for r in rounds for v in r["sites"].values() if v.get("epsilon") is not None]
        summary = {**info, "rounds_run": len(rounds), "initial_val_auc": strategy.initial_val_auc,
                   "rounds_with_failures": failed,
                   "updates_rejected": sum(r.get("fit_rejected", 0) for r in rounds),
                   "evaluations_rejected": sum(r.get("evaluate_rejected", 0) for r in rounds),
                   "megabytes_sent": round(sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / 1e6, 3)}
        if info.get("dp"):
            summary["dp"] = {**info["dp"], "epsilon": max(eps) if eps else None}
        self.meta.input_profile = profile_of(self.data, self.cfg.data)
        write_start(self.cfg, self.meta, self.path)
        save_weights(self.path, self.net)
        write_table(self.path / "history.csv",
                    pd.DataFrame([{"epoch": r["round"] - 1, "val_auc": r.get("global_val_auc"),
                                   "train_loss": float(np.mean([v["train_loss"] for v in r["sites"].values()
                                                                if v.get("train_loss") is not None] or [np.nan]))}
                                  for r in rounds]))
        last = rounds[-1].get("global_val_auc")
        meta = self.meta.model_copy(update={
            "train_seconds": round(time.time() - t0, 1), "epochs_run": len(rounds),
            "best_epoch_metric": {"val_auc": last}, "environment": environment() | {"federated": summary}})
        # a global model that does not beat the untrained one on validation is no result: the run says so
        first, last_auc = strategy.initial_val_auc, rounds[-1].get("global_val_auc")
        if first is None or last_auc is None or not last_auc > first:
            summary["status"] = "failed"
            summary["failure"] = (f"the global model's validation AUC {last_auc} does not beat the untrained "
                                  f"model's {first}")
        else:
            summary["status"] = "complete"
        ev = self.cfg.evaluation

        def federated_section(run, predictor) -> None:
            per_site = []
            thr = run.meta.threshold.value if run.meta.threshold is not None else None
            for site, ds in (site_tests or {}).items():
                row = {"site": site, "n_test": len(ds)}
                if len(ds) and len(np.unique(np.asarray(ds.labels))) > 1:
                    m = compute_metrics(run.meta.task, ds.labels, predictor.predict_dataset(ds), thr, ev.bootstrap,
                                        ev.ci, self.cfg.seed)["metrics"]
                    row["auc"] = m["auc"]
                per_site.append(row)
            summary["per_site_test"] = per_site
            summary["rounds"] = rounds
            write_record(self.path / "federated.json", summary)
            write_section(self.path, "federated", "Federated training", summary)

        run = finish_classifier(self.cfg, meta, self.path, self.data, self.net.eval(), status=summary["status"],
                                after=federated_section)
        return run.dir


def _site_datasets(data, n_sites: int, spec: str, seed: int):
    """(train, val, test) of each site, partitioned by the same rule; warns about sites lacking a class."""
    out = []
    for split in ("train", "val", "test"):
        ds = data.get(split)
        parts = partitioning.partition(ds, n_sites, spec, seed)
        out.append([ds.subset(idx, name=f"site{k}/{split}") for k, idx in enumerate(parts)])
    return list(zip(*out))


def _dp(dp_noise: float | None, dp_clip: float, dp_delta: float) -> dict | None:
    return None if dp_noise is None else {"noise_multiplier": dp_noise, "max_grad_norm": dp_clip, "delta": dp_delta}


def _reporting_rounds(evaluate_fn: Callable, rounds: int, progress: Callable[[int, int], None] | None) -> Callable:
    """``evaluate_fn`` that also reports ``progress(round, rounds)``: Flower calls it once the global model of a
    round exists (round 0: the initial model)."""
    if progress is None:
        return evaluate_fn

    def evaluate(server_round, weights, config):
        out = evaluate_fn(server_round, weights, config)
        progress(min(int(server_round), rounds), rounds)
        return out

    return evaluate


def federate(cfg, *, sites: int = 5, rounds: int = 5, partition: str = "iid", strategy: str = "fedavg",
             local_epochs: int = 1, dp_noise: float | None = None, dp_clip: float = 1.0, dp_delta: float = 1e-5,
             run_dir: str | Path | None = None, overwrite: bool = False, cpus_per_site: float = 1.0,
             log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> Path:
    """Simulate ``sites`` hospitals with Flower's simulation engine; write a run folder.
    ``progress(done, rounds)`` is called as each round's global model has been evaluated."""
    _strategy_class(strategy)
    partitioning.parse_partition(partition)
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1, not {sites}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, not {rounds}")
    path = resolve_run_dir(cfg, run_dir)
    start = RunStart(path, overwrite=overwrite)
    t0 = time.time()
    with start:
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
            k = int(context.node_config["partition-id"])
            tr, va, _ = parts[k]
            net = copy.deepcopy(g.net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MedlensWarning)
                c = SiteClient(f"site{k}", net, tr, va, cfg.train, data.task, n_classes, cfg.seed, g.signature,
                               local_epochs, privacy)
            return c.to_client()

        for k, (tr, _, _) in enumerate(parts):
            miss = missing_classes(tr, n_classes) if get_task(data.task).exclusive else []
            if miss:
                lacking += 1
                warnings.warn(f"site{k} has no training sample of class(es) {miss}", MedlensWarning, stacklevel=2)
        strat = make_strategy(strategy, net_bytes, sites, g.signature, local_epochs,
                              _reporting_rounds(g.evaluate_fn, rounds, progress), log=log)

        def server_fn(context):
            return ServerAppComponents(strategy=strat, config=ServerConfig(num_rounds=rounds))

        log(f"federated: {sites} sites ({partition}), {strategy}, {rounds} rounds")
        # log_to_driver off: Ray forwards its actors' own log lines ("(ClientAppActor pid=..) WARNING: Manually
        # terminating ClientAppActor", printed when a busy machine ends a round late) to this console; a site's
        # failure still reaches the strategy as a failed result, and medlens reports it
        run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn), num_supernodes=sites,
                       backend_config={"client_resources": {"num_cpus": cpus_per_site},
                                       "init_args": {"log_to_driver": False}}, verbose_logging=False)
        info = {"mode": "simulation", "engine": "flwr", "strategy": strategy, "sites": sites, "partition": partition,
                "local_epochs": local_epochs, "sites_missing_a_class": lacking, "sites_without_training_data": empty,
                "site_sizes": [len(p[0]) for p in parts], "dp": privacy}
        return g.finish(strat, info, {f"site{k}": p[2] for k, p in enumerate(parts)}, t0)


def is_local_address(host: str) -> bool:
    """True for a loopback host (127.0.0.0/8, ::1, localhost): nothing outside this machine reaches it."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str, flag: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); one line otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} '{address}' is not host:port")
    return host.strip("[]"), int(port)


def read_site_secrets(path: Path) -> dict[str, bytes]:
    """``--site-secrets FILE``: one ``SITE SECRET`` pair per line (``#`` comments), each secret 16+ characters."""
    out: dict[str, bytes] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the site secrets ({type(e).__name__})", path) from None
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16 or not parts[0].isprintable() or len(parts[0]) > 64:
            raise ConfigError(f"line {no}: expected 'SITE SECRET' with a secret of at least 16 characters", path)
        if parts[0] in out:
            raise ConfigError(f"line {no}: site '{parts[0]}' appears twice", path)
        out[parts[0]] = parts[1].encode()
    if not out:
        raise ConfigError("no 'SITE SECRET' line", path)
    return out


def read_secret(path: Path) -> bytes:
    """``--secret-file FILE``: this site's shared secret (its first line, 16+ characters)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the site secret ({type(e).__name__})", path) from None
    if len(text) < 16 or any(c.isspace() for c in text):
        raise ConfigError("the site secret must be one word of at least 16 characters", path)
    return text.encode()


def check_exposure(address: str, flag: str, tls: bool, authenticated: bool, insecure: bool, role: str) -> None:
    """A non-local address needs TLS (and, on the server, site secrets) unless ``--insecure``."""
    host, _ = split_address(address, flag)
    if insecure or is_local_address(host):
        return
    if not tls:
        need = "--certificates CA,CERT,KEY" if role == "server" else "--root-cert CA"
        raise ConfigError(f"{flag} {address} is not a local address and TLS is off: weights would travel in the "
                          f"clear; give {need}, or --insecure to accept that")
    if not authenticated:
        raise ConfigError(f"{flag} {address} is not a local address and no --site-secrets were given: anyone "
                          "who reaches the port could join as a site; give --site-secrets FILE, or --insecure")


def serve_federation(cfg, *, clients: int, rounds: int, address: str, strategy: str = "fedavg",
                     local_epochs: int = 1, min_fit_clients: int | None = None,
                     round_timeout: float | None = ROUND_TIMEOUT, join_timeout: float = JOIN_TIMEOUT,
                     certificates: tuple[Path, Path, Path] | None = None, site_secrets: Path | None = None,
                     update_norm_factor: float = UPDATE_NORM_FACTOR, insecure: bool = False,
                     run_dir: str | Path | None = None, overwrite: bool = False,
                     log: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None) -> Path:
    """The server process: waits for ``clients`` sites on ``address`` (gRPC), runs ``rounds`` rounds,
    evaluates the global model on its own validation/test data and writes the run folder.

    A non-local ``address`` needs ``certificates`` and ``site_secrets`` unless ``insecure``. Each round waits
    ``round_timeout`` seconds at most for fit and for evaluate answers (a site that died or hangs is a failure)
    and goes on with those that answered, if at least ``min_fit_clients`` valid updates came back."""
    _strategy_class(strategy)
    if clients < 1 or rounds < 1:
        raise ConfigError(f"--clients and --rounds must be at least 1, not {clients} and {rounds}")
    if min_fit_clients is not None and not 1 <= min_fit_clients <= clients:
        raise ConfigError(f"--min-fit-clients {min_fit_clients} must be between 1 and --clients {clients}")
    for flag, v in (("--round-timeout", round_timeout), ("--join-timeout", join_timeout),
                    ("--update-norm-factor", update_norm_factor)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ConfigError(f"{flag} must be a positive number of seconds, not {v}"
                              if "timeout" in flag else f"{flag} must be positive, not {v}")
    site_keys = read_site_secrets(site_secrets) if site_secrets else None
    check_exposure(address, "--address", bool(certificates), site_keys is not None, insecure, "server")
    path = resolve_run_dir(cfg, run_dir)
    start = RunStart(path, overwrite=overwrite)
    t0 = time.time()
    certs = None
    if certificates:
        ca, cert, key = (Path(p).read_bytes() for p in certificates)
        certs = (ca, cert, key)
    with start:
        seed_everything(cfg.seed)
        data = prepared_data(cfg.data, seed=cfg.seed)
        g = _Global(cfg, data, path)
        strat = make_strategy(strategy, get_weights(g.net), clients, g.signature, local_epochs,
                              _reporting_rounds(g.evaluate_fn, rounds, progress), min_fit_clients=min_fit_clients,
                              update_norm_factor=update_norm_factor,
                              site_secrets=site_keys, join_timeout=join_timeout, log=log)
        log(f"federated server on {address}: waiting for {clients} sites, {rounds} rounds ({strategy})"
            + ("" if site_keys else "; sites are not authenticated (no --site-secrets)"))
        start_server(server_address=address, strategy=strat, certificates=certs,
                     client_manager=_bounded_client_manager(round_timeout or 86400.0),
                     config=ServerConfig(num_rounds=rounds, round_timeout=round_timeout))
        info = {"mode": "deployment", "engine": "flwr (gRPC)", "strategy": strategy, "sites": clients,
                "min_fit_clients": min_fit_clients or clients, "local_epochs": local_epochs, "tls": bool(certs),
                "authenticated_sites": sorted(site_keys) if site_keys else None, "round_timeout": round_timeout,
                "update_norm_factor": update_norm_factor, "dp": None}
        return g.finish(strat, info, None, t0)


def join_federation(cfg, *, site_data: Path, server: str, local_epochs: int = 1, root_certificate: Path | None = None,
                    dp_noise: float | None = None, dp_clip: float = 1.0, dp_delta: float = 1e-5,
                    config_file: str = "", site: str | None = None, secret_file: Path | None = None,
                    limits=None, connect_timeout: float = 60.0, server_timeout: float = 2 * ROUND_TIMEOUT,
                    insecure: bool = False) -> None:
    """The client process of one site: its data (``--site-data``, a MedMNIST-layout .npz) stays here.

    The server must answer within ``connect_timeout`` seconds, and say something at least every
    ``server_timeout`` seconds while this site waits (local training is not counted); otherwise the site
    stops with one line. A server that closes the connection mid-federation is one line too."""
    for flag, v in (("--connect-timeout", connect_timeout), ("--server-timeout", server_timeout)):
        if not (np.isfinite(v) and v > 0):
            raise ConfigError(f"{flag} must be a positive number of seconds, not {v}")
    check_exposure(server, "--server", root_certificate is not None, True, insecure, "client")
    secret = read_secret(secret_file) if secret_file else None
    site_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(site_data),
                                                                           "check_md5": False})})
    seed_everything(cfg.seed)
    data = prepared_data(site_cfg.data, seed=cfg.seed)
    g = _Global(site_cfg, data, Path("."))
    root = Path(root_certificate).read_bytes() if root_certificate else None
    name = site or Path(site_data).stem

    class Silent(MedlensError):
        pass

    def alarm(_signum, _frame):
        raise Silent(f"no word from the federated server at {server} for {server_timeout:g} s "
                     "(--server-timeout): this site stops")

    def busy(on: bool) -> None:  # local work is not the server's silence
        signal.setitimer(signal.ITIMER_REAL, 0 if on else server_timeout)

    client = SiteClient(name, g.net, data.train, data.val, cfg.train, data.task,
                        max(len(data.class_names), 2), cfg.seed, g.signature, local_epochs,
                        _dp(dp_noise, dp_clip, dp_delta), config_file, limits=limits, secret=secret, busy=busy)
    channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(root)) if root else \
        grpc.insecure_channel(server)
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError:
        raise MedlensError(f"the federated server at {server} did not answer within {connect_timeout:g} s "
                           "(--connect-timeout)") from None
    finally:
        channel.close()

    watch = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if not watch:
        client.busy = None
    previous = signal.signal(signal.SIGALRM, alarm) if watch else None
    if watch:
        busy(False)
    try:
        start_client(server_address=server, client=client.to_client(), insecure=root is None,
                     root_certificates=root)
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") and e.code() else "UNKNOWN"
        raise MedlensError(f"the federated server at {server} closed the connection ({code}) before the "
                           "federation finished") from None
    finally:
        if watch:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
