"""Federated learning, the site's side: a Flower ``NumPyClient`` that trains the run's network on one site's
data and evaluates the global model there. Flower (``flwr``) carries the weights; nothing here is transport.

Local training reuses the engine's pieces (``ClassifierModule``'s loss and augmentation, the seeded
batch sampler, the optimiser of ``train``), so one site alone trains exactly like ``medlens train``'s step.
FedProx adds ``mu/2 * ||w - w_global||^2`` to the local loss (``proximal_mu`` sent by Flower's FedProx).
Optional client-side DP-SGD uses Opacus (``privacy``); the epsilon spent is returned with each fit.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import torch

from medlens.engine.module import ClassifierModule, outputs_to_probs, validation_scores
from medlens.engine.sampling import make_loader
from medlens.errors import ConfigError, MedlensWarning


def model_signature(meta_like: dict) -> str:
    """A short hash of what makes two networks exchangeable (architecture, parameters, inputs, outputs)."""
    keys = ("model", "model_params", "in_channels", "n_outputs", "input_size", "task")
    return hashlib.sha256(json.dumps({k: meta_like[k] for k in keys}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def get_weights(net: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in net.state_dict().values()]


def set_weights(net: torch.nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(net.state_dict().keys())
    net.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights)}, strict=True)


def local_fit(net, ds, train_cfg, task: str, seed: int, round_no: int, epochs: int, proximal_mu: float = 0.0,
              privacy: dict | None = None, privacy_engine=None) -> dict:
    """Train ``net`` in place on ``ds`` for ``epochs`` local epochs; returns loss and (with DP) epsilon.

    With ``privacy`` the step is Opacus DP-SGD; pass the same ``privacy_engine`` every round so its accountant
    composes the rounds and the epsilon returned is what the site has spent so far."""
    module = ClassifierModule(net, task, train_cfg, seed=seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    global_w = [p.detach().clone() for p in params] if proximal_mu else None
    loader = make_loader(ds, train_cfg.batch_size, "shuffle", seed * 10_007 + round_no)
    model, engine = net, None
    if privacy:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        net.train()
        problems = ModuleValidator.validate(net, strict=False)
        if problems:
            raise ConfigError(f"DP-SGD (Opacus) cannot train this model: {str(problems[0]).splitlines()[0]} "
                              "(choose a model without BatchNorm)")
        for m in net.modules():  # Opacus' per-sample hooks forbid in-place activations (same maths, no weights)
            if getattr(m, "inplace", False):
                m.inplace = False
        engine = privacy_engine or PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(module=net, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=privacy["noise_multiplier"],
                                                 max_grad_norm=privacy["max_grad_norm"],
                                                 poisson_sampling=False)
    model.train()
    gen = torch.Generator()
    losses = []
    for e in range(epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
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
    if engine is not None:
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


def _flwr_client_base():
    from flwr.client import NumPyClient

    return NumPyClient


class SiteClient(_flwr_client_base()):
    """One hospital: its training and validation data never leave this object; only weights do."""

    def __init__(self, site: str, net, train_ds, val_ds, train_cfg, task: str, n_classes: int, seed: int,
                 signature: str, local_epochs: int = 1, privacy: dict | None = None, config_file: str = "") -> None:
        self.site, self.net, self.train_ds, self.val_ds = site, net, train_ds, val_ds
        self.cfg, self.task, self.n_classes, self.seed = train_cfg, task, n_classes, seed
        self.signature, self.local_epochs, self.privacy, self.config_file = signature, local_epochs, privacy, config_file
        self.privacy_engine = None
        if privacy:
            from opacus import PrivacyEngine

            self.privacy_engine = PrivacyEngine(accountant="rdp")
        self.missing = missing_classes(train_ds, n_classes) if task != "multilabel" else []
        if self.missing:
            warnings.warn(f"site {site}: no training sample of class(es) {self.missing}", MedlensWarning, stacklevel=2)

    def _check(self, config: dict) -> None:
        theirs = config.get("model_signature")
        if theirs is not None and theirs != self.signature:
            raise ConfigError(f"model config mismatch: the server's model is {theirs}, this site's config builds "
                              f"{self.signature} (same model, params, inputs and classes needed)",
                              self.config_file or None)

    def get_properties(self, config):
        return {"model_signature": self.signature, "site": self.site}

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        self._check(config)
        if len(self.train_ds) == 0:  # nothing to learn from here: the weights go back unchanged, with weight 0
            return parameters, 0, {"site": self.site, "missing_classes": len(self.missing)}
        set_weights(self.net, parameters)
        rnd = int(config.get("server_round", 0))
        res = local_fit(self.net, self.train_ds, self.cfg, self.task, self.seed, rnd,
                        int(config.get("local_epochs", self.local_epochs)), float(config.get("proximal_mu", 0.0)),
                        self.privacy, self.privacy_engine)
        metrics = {"site": self.site, "train_loss": res["train_loss"], "missing_classes": len(self.missing)}
        if "epsilon" in res:
            metrics["epsilon"] = res["epsilon"]
        return get_weights(self.net), len(self.train_ds), metrics

    def evaluate(self, parameters, config):
        self._check(config)
        set_weights(self.net, parameters)
        if len(self.val_ds) == 0:  # a site with no validation cases adds nothing to the federated evaluation
            return 0.0, 0, {"site": self.site}
        prob = predict(self.net, self.val_ds, self.task)
        scores = validation_scores(self.task, torch.as_tensor(prob), torch.as_tensor(np.asarray(self.val_ds.labels)))
        return float(1.0 - scores["val_auc"]), len(self.val_ds), {"site": self.site, "val_auc": scores["val_auc"]}
