"""Fitting an autoencoder on normal images only (``task: anomaly``).

The network is a ``ClassifierNet`` around ``models.autoencoder.AnomalyAutoEncoder``: it is trained to
reconstruct its (normalised) input; validation monitors the reconstruction loss on the normal validation
images (``val_loss``), so model selection sees no abnormal image. After fitting, the score's location and
scale are set from the normal training images, which makes the network's output an anomaly logit. The
threshold, calibration and evaluation are the workflow's (``medlens.workflow.anomaly``), as for classifiers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medlens.engine.module import ClassifierModule
from medlens.engine.network import ClassifierNet
from medlens.engine.sampling import make_loader
from medlens.engine.train import FitResult, fit_module, save_best
from medlens.errors import ConfigError
from medlens.models.autoencoder import AnomalyAutoEncoder
from medlens.utils import atomic_path

KL_WEIGHT = 1e-3   # VarAutoEncoder: weight of the KL term per latent unit against the per-pixel MSE


def autoencoder(net: ClassifierNet) -> AnomalyAutoEncoder:
    """The autoencoder inside a run's network; a one-line error for a network that is not one."""
    if not isinstance(net.net, AnomalyAutoEncoder):
        raise ConfigError(f"task: anomaly needs an autoencoder model, not {type(net.net).__name__}")
    return net.net


class AutoencoderModule(ClassifierModule):
    """Reconstruction training; optimiser, schedule, per-step seeding and augmentation are the classifiers'."""

    def __init__(self, model: ClassifierNet, train_cfg, seed: int = 0) -> None:
        super().__init__(model, "binary", train_cfg, seed=seed)

    def reconstruction_loss(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.model.normalize(x)
        ae = autoencoder(self.model)
        if ae.variational:
            recon, mu, logvar, _ = ae.ae(xn)
            kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
            return F.mse_loss(recon.float(), xn.float()) + KL_WEIGHT * kl.float()
        return F.mse_loss(ae.reconstruct(xn).float(), xn.float())

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = self.reconstruction_loss(self.augment(x, self._gen))
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", self.reconstruction_loss(x), on_step=False, on_epoch=True, batch_size=len(x))

    def on_validation_epoch_end(self) -> None:
        pass


@torch.no_grad()
def anomaly_scores(net: ClassifierNet, ds, score: str | None = None, batch: int = 256) -> np.ndarray:
    """(N,) raw anomaly scores of a dataset (``score``: mse, l1 or ssim; default: the network's)."""
    net = net.eval()
    out = []
    for i in range(0, len(ds), batch):
        x, _ = ds.batch(np.arange(i, min(i + batch, len(ds))))
        out.append(autoencoder(net).raw_score(net.normalize(x), score).float())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def fit_autoencoder(cfg, train_normal, val_normal, net: ClassifierNet, run: Path, resume: bool, callbacks=None,
                    progress_bar: bool = True) -> tuple[ClassifierNet, FitResult]:
    """Train on ``train_normal`` (normal images only), select the epoch by the reconstruction loss on
    ``val_normal``; returns the best network (its score is standardised by ``set_score``)."""
    t0 = time.time()
    module = AutoencoderModule(net, cfg.train, seed=cfg.seed)
    train_loader = make_loader(train_normal, cfg.train.batch_size, "shuffle", cfg.seed)
    val_loader = make_loader(val_normal, max(cfg.train.batch_size, 256), "sequential")
    best, epochs, _ = fit_module(cfg, module, train_loader, val_loader, run, "val_loss", resume, callbacks, progress_bar)
    save_best(module, run)
    return module.model.eval(), FitResult(best, epochs, "val_loss", time.time() - t0)


def set_score(net: ClassifierNet, score: str, train_normal, run: Path) -> ClassifierNet:
    """Make ``score`` the network's anomaly score, standardise it on the normal training images (the logit's
    location and scale) and write the weights (``model.pt``) with it."""
    ae = autoencoder(net)
    ae.score = score
    ae.standardise(torch.from_numpy(anomaly_scores(net, train_normal)))
    with atomic_path(run / "model.pt") as tmp:
        torch.save(net.state_dict(), tmp)
    return net
