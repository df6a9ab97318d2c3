"""Convolutional autoencoders for unsupervised anomaly detection (MONAI ``AutoEncoder`` / ``VarAutoEncoder``).

``AnomalyAutoEncoder`` wraps the MONAI network so that the run contract stays the classifiers': its
``forward`` returns one logit per image, the standardised log anomaly score
``(log(score) - loc) / scale``, where ``score`` is the reconstruction error (``mse``, ``l1``) or the SSIM
dissimilarity ``1 - SSIM`` and ``loc``/``scale`` (buffers, saved with the weights) are the mean and standard
deviation of ``log(score)`` over the normal training images. The sigmoid of that logit is monotonic in the
score, so AUC, the validation-chosen threshold, calibration and every evaluation of a binary classifier apply
unchanged. ``error_map`` gives the pixel-wise anomaly map; ``reconstruct`` the reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.nets import AutoEncoder, VarAutoEncoder

from medlens.errors import ConfigError
from medlens.models.registry import register_model

SCORES = ("mse", "l1", "ssim")
SSIM_KERNEL = 7       # Gaussian window (sigma 1.5) for SSIM: small images (28 px) need a small window
_EPS = 1e-8


class AnomalyAutoEncoder(nn.Module):
    """Autoencoder whose output is an anomaly logit; see the module docstring."""

    score_loc: torch.Tensor    # buffers: the log scores' mean and standard deviation on normal training images
    score_scale: torch.Tensor

    def __init__(self, ae: nn.Module, spatial_dims: int, score: str, variational: bool) -> None:
        super().__init__()
        if score not in SCORES:
            raise ConfigError(f"anomaly score '{score}' is not one of {', '.join(SCORES)}")
        self.ae, self.spatial_dims, self.score, self.variational = ae, spatial_dims, score, variational
        self.register_buffer("score_loc", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ae(x)
        return out[0] if self.variational else out

    def error_map(self, x: torch.Tensor, score: str | None = None, recon: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel-wise anomaly map (N, *spatial): squared or absolute error, or 1 - local SSIM, channel mean."""
        score = score or self.score
        r = self.reconstruct(x) if recon is None else recon
        if score == "mse":
            return ((x - r) ** 2).mean(1)
        if score == "l1":
            return (x - r).abs().mean(1)
        k = min(SSIM_KERNEL, *x.shape[2:])
        ssim, _ = compute_ssim_and_cs(r.float(), x.float(), self.spatial_dims, [k] * self.spatial_dims,
                                      [1.5] * self.spatial_dims, data_range=1.0)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(1 - ssim, size=tuple(x.shape[2:]), mode=mode, align_corners=False).mean(1)

    def raw_score(self, x: torch.Tensor, score: str | None = None, recon: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) anomaly score: the mean of the error map (for ``ssim``: 1 - mean SSIM)."""
        return self.error_map(x, score, recon).flatten(1).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.raw_score(x).clamp_min(0)
        return ((torch.log(s + _EPS) - self.score_loc) / self.score_scale).unsqueeze(1)

    def standardise(self, scores: torch.Tensor) -> None:
        """Set ``loc``/``scale`` from the scores of normal training images."""
        z = torch.log(scores.double().clamp_min(0) + _EPS)
        self.score_loc.fill_(float(z.mean()))
        self.score_scale.fill_(max(float(z.std()), 1e-6))


@register_model("autoencoder", dims=(2, 3), task="anomaly")
def autoencoder(in_channels: int, num_outputs: int, spatial_dims: int = 2, input_size=None,
                channels: tuple[int, ...] = (16, 32, 4), strides: tuple[int, ...] = (2, 2, 1),
                latent_size: int | None = None, num_res_units: int = 0, score: str = "mse") -> nn.Module:
    """Convolutional autoencoder for anomaly detection (MONAI AutoEncoder; VarAutoEncoder when latent_size is set)."""
    if num_outputs != 1:
        raise ConfigError("model 'autoencoder' scores anomalies (one output); use it with task: anomaly")
    channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
    if len(channels) != len(strides):
        raise ConfigError(f"model 'autoencoder': {len(channels)} channels but {len(strides)} strides")
    if latent_size:
        if input_size is None:
            raise ConfigError("model 'autoencoder' with latent_size needs the input size")
        shape = (in_channels,) + tuple(int(s) for s in input_size)[-spatial_dims:]
        ae = VarAutoEncoder(spatial_dims, shape, in_channels, int(latent_size), channels, strides,
                            num_res_units=num_res_units, use_sigmoid=True, use_mean_at_inference=True)
    else:
        ae = AutoEncoder(spatial_dims, in_channels, in_channels, channels, strides, num_res_units=num_res_units)
    net = AnomalyAutoEncoder(ae, spatial_dims, score, variational=bool(latent_size))
    if input_size is not None:  # the decoder must give back the input grid
        size = tuple(int(s) for s in input_size)[-spatial_dims:]
        with torch.no_grad():
            out = net.eval().reconstruct(torch.zeros((1, in_channels) + size))
        if tuple(out.shape[2:]) != size:
            raise ConfigError(f"model 'autoencoder': channels {list(channels)} / strides {list(strides)} "
                              f"reconstruct {list(out.shape[2:])} from {list(size)}; choose strides that divide "
                              "the input size")
        net.train()
    return net
