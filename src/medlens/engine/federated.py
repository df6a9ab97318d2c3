"""Federated learning, the site's side: a Flower ``NumPyClient`` that trains the run's network on one site's
data and evaluates the global model there. Flower (``flwr``) carries the weights; nothing here is transport.

Local training reuses the engine's pieces (``ClassifierModule``'s loss and augmentation, the seeded
batch sampler, the optimiser of ``train``), so one site alone trains exactly like ``medlens train``'s step.
FedProx adds ``mu/2 * ||w - w_global||^2`` to the local loss (``proximal_mu`` sent by Flower's FedProx).
Optional client-side DP-SGD uses Opacus (``privacy``); the epsilon spent is returned with each fit.

Neither side trusts the other (SECURITY.md, docs/distributed.md):

- the site bounds what a server may ask (``ClientLimits``: local epochs, proximal mu, learning rate, round
  number) and refuses weights that do not fit its own network or are not finite; it never returns weights
  that local training made non-finite. A refusal raises a one-line error, so the site's process stops.
- the server checks every update before it is aggregated (``update_problem``: count, shapes and dtypes of the
  global model, finite, ``||w_site - w_global|| <= factor * max(||w_global||, eps)``);
- with a per-site shared secret, every fit and evaluate result carries an HMAC-SHA256 (``result_tag``) over
  the site, the round, the server's per-round nonce and a digest of what it returns; the server checks it
  with ``hmac.compare_digest``. Flower 1.41's own node authentication does not exist for the gRPC-bidi
  transport that ``start_server`` / ``start_client`` use (``authentication_keys`` only logs an error there).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from flwr.client import NumPyClient
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from medlens.engine.module import ClassifierModule, outputs_to_probs, validation_scores
from medlens.engine.sampling import make_loader
from medlens.errors import ConfigError, DataError, MedlensWarning
from medlens.tasks import get_task


def model_signature(meta_like: dict) -> str:
    """A short hash of what makes two networks exchangeable (architecture, parameters, inputs, outputs)."""
    keys = ("model", "model_params", "in_channels", "n_outputs", "input_size", "task")
    return hashlib.sha256(json.dumps({k: meta_like[k] for k in keys}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def get_weights(net: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in net.state_dict().values()]


@dataclass(frozen=True)
class ClientLimits:
    """The most a federated server may ask of this site in one round (``federate client --max-*``)."""

    max_local_epochs: int = 100
    max_proximal_mu: float = 10.0
    max_lr: float = 1.0
    max_round: int = 1_000_000


def _number(config: dict, key: str, default, kind):
    """``config[key]`` as ``kind`` (int or float); a string, bool, bytes or non-finite value is refused."""
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"the federated server sent {key}={str(v)[:40]!r}: not a finite number, round refused")
    if kind is int and isinstance(v, float) and not v.is_integer():
        raise ConfigError(f"the federated server sent {key}={v!r}: not a whole number, round refused")
    return kind(v)


def server_request(config: dict, limits: ClientLimits, local_epochs: int, lr: float) -> dict:
    """What the server asks for this round, each value checked against ``limits``; one-line refusal otherwise."""
    req = {"server_round": _number(config, "server_round", 0, int),
           "local_epochs": _number(config, "local_epochs", local_epochs, int),
           "proximal_mu": _number(config, "proximal_mu", 0.0, float),
           "lr": _number(config, "lr", lr, float) if "lr" in config else None}
    bounds = {"server_round": (0, limits.max_round, "a fixed limit"),
              "local_epochs": (1, limits.max_local_epochs, "--max-local-epochs"),
              "proximal_mu": (0.0, limits.max_proximal_mu, "--max-proximal-mu"),
              "lr": (0.0, limits.max_lr, "--max-lr")}
    for key, (lo, hi, flag) in bounds.items():
        v = req[key]
        if v is None:  # no learning rate sent: the site's own config decides
            continue
        if v > hi or v < lo or (key == "lr" and v <= 0):
            rng = f"0 < {key} <= {hi!r}" if key == "lr" else f"{lo!r} <= {key} <= {hi!r}"
            raise ConfigError(f"the federated server asked for {key}={v!r}; this site allows {rng} ({flag}): "
                              "round refused")
    return req


def weights_problem(weights: list, reference: list[np.ndarray]) -> str | None:
    """Why ``weights`` cannot stand for ``reference`` (count, shape, dtype, finiteness), or None."""
    if len(weights) != len(reference):
        return f"{len(weights)} arrays instead of {len(reference)}"
    for i, (w, r) in enumerate(zip(weights, reference)):
        if not isinstance(w, np.ndarray):
            return f"array {i} is a {type(w).__name__}, not an array"
        if w.shape != r.shape:
            return f"array {i} has shape {list(w.shape)} instead of {list(r.shape)}"
        if w.dtype != r.dtype:
            return f"array {i} has dtype {w.dtype} instead of {r.dtype}"
        if w.dtype.kind in "fc" and not np.isfinite(w).all():
            return f"array {i} holds non-finite values (NaN or infinity)"
    return None


def _norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays))


def update_problem(update: list, global_w: list[np.ndarray], max_ratio: float, eps: float = 1e-6) -> str | None:
    """Why a site's update must not be aggregated, or None: wrong arrays, non-finite values, or a step
    ``||w_site - w_global||`` (floating-point arrays) above ``max_ratio * max(||w_global||, eps)``."""
    bad = weights_problem(update, global_w)
    if bad:
        return bad
    floats = [i for i, g in enumerate(global_w) if g.dtype.kind == "f"]
    with np.errstate(over="ignore", invalid="ignore"):
        step = _norm([update[i].astype(np.float64) - global_w[i] for i in floats])
    bound = max_ratio * max(_norm([global_w[i] for i in floats]), eps)
    if not math.isfinite(step) or step > bound:
        return f"update norm {step:.3g} exceeds {max_ratio:g} x the global model's norm ({bound:.3g})"
    return None


def digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes: what a result tag binds."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def result_tag(secret: bytes, kind: str, site: str, server_round: int, nonce: str, n: int, body: str) -> str:
    """HMAC-SHA256 of one fit/evaluate result under the site's shared secret."""
    msg = json.dumps([kind, site, int(server_round), nonce, int(n), body]).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def eval_body(loss: float, val_auc) -> str:
    return json.dumps([float(loss), None if val_auc is None else float(val_auc)])


def set_weights(net: torch.nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(net.state_dict().keys())
    net.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights)}, strict=True)


def local_fit(net, ds, train_cfg, task: str, seed: int, round_no: int, epochs: int, proximal_mu: float = 0.0,
              privacy: dict | None = None, privacy_engine=None, lr: float | None = None) -> dict:
    """Train ``net`` in place on ``ds`` for ``epochs`` local epochs; returns loss and (with DP) epsilon.

    With ``privacy`` the step is Opacus DP-SGD; pass the same ``privacy_engine`` every round so its accountant
    composes the rounds and the epsilon returned is what the site has spent so far."""
    module = ClassifierModule(net, task, train_cfg, seed=seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_cfg.lr if lr is None else lr, weight_decay=train_cfg.weight_decay)
    global_w = [p.detach().clone() for p in params] if proximal_mu else None
    loader = make_loader(ds, train_cfg.batch_size, "shuffle", seed * 10_007 + round_no)
    model, engine = net, None
    if privacy:
        net.train()
        problems = ModuleValidator.validate(net, strict=False)
        if problems:
            raise ConfigError(f"DP-SGD (Opacus) cannot train this model: {str(problems[0]).splitlines()[0]} "
                              "(choose a model without BatchNorm)")
        for m in net.modules():  # Opacus' per-sample hooks forbid in-place activations (same maths, no weights)
            if getattr(m, "inplace", False):
                m.inplace = False
        engine = privacy_engine or PrivacyEngine(accountant="rdp")
        # opacus types the result for every grad_sample_mode; the default ("hooks", wrapped) gives these three
        model, opt, loader = cast(tuple[GradSampleModule, DPOptimizer, DataLoader], engine.make_private(
            module=net, optimizer=opt, data_loader=loader, noise_multiplier=privacy["noise_multiplier"],
            max_grad_norm=privacy["max_grad_norm"], poisson_sampling=False))
    model.train()
    gen = torch.Generator()
    losses = []
    for e in range(epochs):
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(e)
        for step, (x, y) in enumerate(loader):
            s = seed * 1_000_003 + round_no * 100_003 + e * 1009 + step
            torch.manual_seed(s)
            gen.manual_seed(s + 7)
            x = module.augment(x, gen)
            loss = module.loss(model(x), y)
            if global_w is not None:
                loss = loss + proximal_mu / 2 * sum(((p - g) ** 2).sum() for p, g in zip(params, global_w))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    out = {"train_loss": float(np.mean(losses)) if losses else float("nan")}
    if engine is not None and privacy is not None:
        out["epsilon"] = float(engine.get_epsilon(privacy["delta"]))
        model._close()  # the per-sample gradient hooks go; the accountant keeps the rounds
    net.eval()
    return out


@torch.no_grad()
def predict(net, ds, task: str, batch_size: int = 512) -> np.ndarray:
    net.eval()
    outs = [outputs_to_probs(task, net(x)) for x, _ in make_loader(ds, batch_size, "sequential")]
    return torch.cat(outs).numpy() if outs else np.zeros((0,))


def missing_classes(ds, n_classes: int) -> list[int]:
    """Classes with no sample at this site (single-label tasks)."""
    counts = np.bincount(np.asarray(ds.labels).reshape(-1).astype(int), minlength=n_classes)
    return [int(c) for c in np.flatnonzero(counts == 0)]


class SiteClient(NumPyClient):
    """One hospital: its training and validation data never leave this object; only weights do.

    ``limits`` bounds what the server may ask; ``secret`` (bytes) tags every result for the server to
    authenticate; ``busy`` (called with True on entering and False on leaving each request) lets the caller's
    watchdog time only the waits for the server, not local training."""

    def __init__(self, site: str, net, train_ds, val_ds, train_cfg, task: str, n_classes: int, seed: int,
                 signature: str, local_epochs: int = 1, privacy: dict | None = None, config_file: str = "",
                 limits: ClientLimits | None = None, secret: bytes | None = None, busy=None) -> None:
        self.site, self.net, self.train_ds, self.val_ds = site, net, train_ds, val_ds
        self.cfg, self.task, self.n_classes, self.seed = train_cfg, task, n_classes, seed
        self.signature, self.local_epochs, self.privacy, self.config_file = signature, local_epochs, privacy, config_file
        self.limits, self.secret, self.busy = limits or ClientLimits(), secret, busy
        self.reference = get_weights(net)
        self.privacy_engine = None
        if privacy:
            self.privacy_engine = PrivacyEngine(accountant="rdp")
        self.missing = missing_classes(train_ds, n_classes) if get_task(task).exclusive else []
        if self.missing:
            warnings.warn(f"site {site}: no training sample of class(es) {self.missing}", MedlensWarning, stacklevel=2)

    def _check(self, config: dict) -> None:
        theirs = config.get("model_signature")
        if theirs is not None and theirs != self.signature:
            raise ConfigError(f"model config mismatch: the server's model is {str(theirs)[:40]}, this site's config "
                              f"builds {self.signature} (same model, params, inputs and classes needed)",
                              self.config_file or None)

    def _weights(self, parameters) -> None:
        """Refuse global weights that do not fit this site's network or are not finite; then load them."""
        bad = weights_problem(list(parameters), self.reference)
        if bad:
            raise DataError(f"the federated server sent weights this site refuses: {bad}")
        set_weights(self.net, parameters)

    def _tag(self, metrics: dict, kind: str, config: dict, n: int, body: str) -> dict:
        if self.secret is not None:
            rnd = _number(config, "server_round", 0, int)
            nonce = str(config.get("nonce", ""))[:128]
            metrics["auth"] = result_tag(self.secret, kind, self.site, rnd, nonce, n, body)
        return metrics

    def _busy(self, on: bool) -> None:
        if self.busy is not None:
            self.busy(on)

    def get_properties(self, config):
        return {"model_signature": self.signature, "site": self.site}

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        self._busy(True)
        try:
            return self._fit(parameters, config)
        finally:
            self._busy(False)

    def _fit(self, parameters, config):
        self._check(config)
        req = server_request(config, self.limits, self.local_epochs, self.cfg.lr)
        self._weights(parameters)
        if len(self.train_ds) == 0:  # nothing to learn from here: the weights go back unchanged, with weight 0
            out, n, metrics = get_weights(self.net), 0, {"site": self.site, "missing_classes": len(self.missing)}
        else:
            res = local_fit(self.net, self.train_ds, self.cfg, self.task, self.seed, req["server_round"],
                            req["local_epochs"], req["proximal_mu"], self.privacy, self.privacy_engine, lr=req["lr"])
            out, n = get_weights(self.net), len(self.train_ds)
            if weights_problem(out, self.reference) or not math.isfinite(res["train_loss"]):
                raise DataError(f"site {self.site}: local training diverged (non-finite weights or loss in round "
                                f"{req['server_round']}); nothing sent")
            metrics = {"site": self.site, "train_loss": res["train_loss"], "missing_classes": len(self.missing)}
            if "epsilon" in res:
                metrics["epsilon"] = res["epsilon"]
        return out, n, self._tag(metrics, "fit", config, n, digest(out))

    def evaluate(self, parameters, config):
        self._busy(True)
        try:
            return self._evaluate(parameters, config)
        finally:
            self._busy(False)

    def _evaluate(self, parameters, config):
        self._check(config)
        _number(config, "server_round", 0, int)
        self._weights(parameters)
        if len(self.val_ds) == 0:  # a site with no validation cases adds nothing to the federated evaluation
            return 0.0, 0, self._tag({"site": self.site}, "evaluate", config, 0, eval_body(0.0, None))
        prob = predict(self.net, self.val_ds, self.task)
        # a copy: Ray hands a site its labels as a read-only array, which torch warns about
        scores = validation_scores(self.task, torch.as_tensor(prob), torch.as_tensor(np.array(self.val_ds.labels)))
        loss, n = float(1.0 - scores["val_auc"]), len(self.val_ds)
        metrics = {"site": self.site, "val_auc": float(scores["val_auc"])}
        return loss, n, self._tag(metrics, "evaluate", config, n, eval_body(loss, metrics["val_auc"]))
