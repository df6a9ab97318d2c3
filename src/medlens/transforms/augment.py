"""Batch augmentation on tensors, 2D and 3D, reproducible.

As in TorchIO, each transform first draws its parameters per sample from a seeded ``torch.Generator``
(``sample_geometric``, ``sample_intensity``) and then applies a deterministic function of those
parameters (``apply_geometric``, ``apply_intensity``); the parameters of the last call are kept in
``last_params``. The whole batch is transformed at once (one ``affine_grid``/``grid_sample`` call),
which on 2 CPU cores is far faster than per-sample pipelines. The same seed gives the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from medlens.config import AugmentConfig


@dataclass
class GeometricParams:
    """Per-sample geometry; ``None`` where the transform is off."""

    hflip: torch.Tensor | None = None      # (B,) bool: flip the last axis
    vflip: torch.Tensor | None = None      # (B,) bool: flip the second-to-last axis
    rot90: torch.Tensor | None = None      # (B,) int: quarter turns in the (H, W) plane
    angle: torch.Tensor | None = None      # (B,) radians, in-plane rotation (about the slice axis in 3D)
    scale: torch.Tensor | None = None      # (B,) isotropic zoom factor (> 1 magnifies)
    translate: torch.Tensor | None = None  # (B, nd) shift as a fraction of each axis' size, order (x, y[, z])
    shear: torch.Tensor | None = None      # (B,) radians: x shifted by tan(shear) * y (Keras shear_range)
    dflip: torch.Tensor | None = None      # (B,) bool: flip the third-to-last (depth) axis of 3D inputs


@dataclass
class IntensityParams:
    """Per-sample intensity changes; ``None`` where the transform is off."""

    gain: torch.Tensor | None = None   # (B,) contrast factor about the sample's mean
    bias: torch.Tensor | None = None   # (B,) brightness shift, as a fraction of the sample's range
    sigma: torch.Tensor | None = None  # (B,) noise std, as a fraction of the sample's std
    noise: torch.Tensor | None = None  # standard normal noise of the batch's shape


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over a sample."""
    return v.view(-1, *[1] * (ndim - 1))


def _uniform(n: int, half_width: float, g: torch.Generator) -> torch.Tensor:
    """``n`` values uniform in [-half_width, half_width]."""
    return (torch.rand(n, generator=g) * 2 - 1) * half_width


class BatchAugment:
    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.last_params: dict[str, GeometricParams | IntensityParams] = {}

    @property
    def active(self) -> bool:
        return any(float(v) for v in self.cfg.model_dump().values())

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``x`` of shape (B, C, H, W) or (B, C, D, H, W), values in any range."""
        if not self.active:
            return x
        return self.intensity(self.geometric(x, generator), generator)

    # geometry -----------------------------------------------------------------------------------

    def geometric(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flips, 90-degree turns and the affine part: apply to an image and its mask together
        (concatenated along channels) to keep them aligned."""
        p = self.sample_geometric(x.shape, generator)
        self.last_params["geometric"] = p
        return self.apply_geometric(x, p)

    def sample_geometric(self, shape, generator: torch.Generator) -> GeometricParams:
        """Draw per-sample geometry for a batch of ``shape``.

        ``rot90`` turns by k quarter turns in the (H, W) plane. A non-square (H != W) input cannot
        turn by 90 or 270 degrees without changing shape, so there k is drawn from {0, 2} only
        (0 or 180 degrees); square inputs draw k from {0, 1, 2, 3}.
        """
        c, g = self.cfg, generator
        b, nd = shape[0], len(shape) - 2
        p = GeometricParams()
        if c.hflip:
            p.hflip = torch.rand(b, generator=g) < c.hflip
        if c.vflip:
            p.vflip = torch.rand(b, generator=g) < c.vflip
        if c.rot90:
            square = shape[-1] == shape[-2]
            k = torch.randint(0, 4 if square else 2, (b,), generator=g)
            p.rot90 = k if square else 2 * k
        if c.rotate or c.translate or c.scale or c.shear:
            p.angle = _uniform(b, math.radians(c.rotate), g)
            p.scale = 1 + _uniform(b, c.scale, g)
            p.translate = _uniform(b * nd, c.translate, g).view(b, nd)
        if c.shear:  # drawn after the others, so configs without shear draw exactly what they drew before
            p.shear = _uniform(b, math.radians(c.shear), g)
        if c.dflip and nd == 3:  # drawn last, likewise
            p.dflip = torch.rand(b, generator=g) < c.dflip
        return p

    def apply_geometric(self, x: torch.Tensor, p: GeometricParams) -> torch.Tensor:
        """Apply drawn geometry (deterministic)."""
        if p.hflip is not None:
            x = torch.where(_per_sample(p.hflip, x.ndim), x.flip(-1), x)
        if p.vflip is not None:
            x = torch.where(_per_sample(p.vflip, x.ndim), x.flip(-2), x)
        if p.dflip is not None:
            x = torch.where(_per_sample(p.dflip, x.ndim), x.flip(-3), x)
        if p.rot90 is not None:
            x = torch.stack([torch.rot90(x[i], int(p.rot90[i]), dims=(-2, -1)) for i in range(len(x))])
        if p.angle is not None and p.scale is not None and p.translate is not None:  # drawn together
            x = affine(x, p.angle, p.scale, p.translate, p.shear)
        return x

    # intensity ----------------------------------------------------------------------------------

    def intensity(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and noise: images only."""
        p = self.sample_intensity(x.shape, generator)
        self.last_params["intensity"] = p
        return self.apply_intensity(x, p)

    def sample_intensity(self, shape, generator: torch.Generator) -> IntensityParams:
        """Draw per-sample contrast gain, brightness shift and noise level (and the noise itself)."""
        c, g = self.cfg, generator
        b = shape[0]
        p = IntensityParams()
        if c.brightness or c.contrast:
            p.gain = 1 + _uniform(b, c.contrast, g)
            p.bias = _uniform(b, c.brightness, g)
        if c.noise:
            p.sigma = torch.rand(b, generator=g) * c.noise
            p.noise = torch.randn(tuple(shape), generator=g)
        return p

    def apply_intensity(self, x: torch.Tensor, p: IntensityParams) -> torch.Tensor:
        """Apply drawn intensity changes, each scaled by the sample's own statistics: the brightness
        shift by its range (max - min), the noise by its standard deviation."""
        dims = tuple(range(1, x.ndim))
        if p.gain is not None and p.bias is not None:  # drawn together
            mean = x.mean(dim=dims, keepdim=True)
            spread = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)).clamp_min(1e-6)
            x = (x - mean) * _per_sample(p.gain, x.ndim) + mean + _per_sample(p.bias, x.ndim) * spread
        if p.sigma is not None and p.noise is not None:  # drawn together
            std = x.flatten(1).std(dim=1).clamp_min(1e-6)
            x = x + _per_sample(p.sigma * std, x.ndim) * p.noise.to(x.dtype)
        return x


def affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor,
           shear: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate in the (H, W) plane by ``angle`` (radians), zoom by ``scale`` about the centre and shift by
    ``translate`` (fraction of each axis' size, order x, y[, z]), per sample, bilinear, border padding.
    ``shear`` (radians) shears x along y in pixel units before the rotation: ``x' = x + tan(shear) y``.

    The rotation is rigid in pixel units: ``affine_grid`` works in normalised coordinates, where a
    non-square image's axes have different units, so the pixel-space matrix ``A`` is conjugated by
    the half sizes ``S``: ``theta = S^-1 A S``.
    """
    b, nd = x.shape[0], x.ndim - 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a = torch.zeros(b, nd, nd)
    a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = cos, -sin, sin, cos
    if shear is not None:  # R @ [[1, tan s], [0, 1]]: the second column gains tan(s) times the first
        t = torch.tan(shear)
        a[:, 0, 1] = a[:, 0, 1] + t * cos
        a[:, 1, 1] = a[:, 1, 1] + t * sin
    if nd == 3:
        a[:, 2, 2] = 1 / scale
    half = torch.tensor(x.shape[2:][::-1], dtype=torch.float64) / 2  # (W, H[, D]): the x, y[, z] order
    ratio = (half[None, :] / half[:, None]).float()  # S_j / S_i
    theta = torch.cat([a * ratio, 2 * translate[:, :, None]], dim=2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip_axes(cfg: AugmentConfig, spatial_dims: int) -> list[int]:
    """The tensor axes that training flips (hflip: -1, vflip: -2, dflip: -3 in 3D): those flip test-time
    augmentation may average over, since the model was trained not to care about them."""
    axes = [a for a, on in ((-1, cfg.hflip), (-2, cfg.vflip), (-3, cfg.dflip and spatial_dims == 3)) if on]
    return axes


def tta_flips(cfg: AugmentConfig, spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of the training flips, the identity first: ``[(), (-1,), (-2,), (-1, -2)]`` for a
    config that flips both in-plane axes."""
    axes = flip_axes(cfg, spatial_dims)
    return [c for r in range(len(axes) + 1) for c in combinations(axes, r)]


# batch mixing (mixup / cutmix) ------------------------------------------------------------------

@dataclass
class MixParams:
    """One batch's mixing: which method, the partner of each sample and the share ``lam`` of its own image
    (for cutmix, the share of the area outside the pasted box)."""

    method: str                      # "mixup" or "cutmix"
    perm: torch.Tensor               # (B,) index of the partner sample
    lam: float
    box: tuple[tuple[int, int], ...] = ()  # cutmix: (start, stop) per spatial axis


def sample_mix(shape, mixup: float, cutmix: float, generator: torch.Generator) -> MixParams | None:
    """Draw one batch's mixing: mixup with Beta(mixup, mixup), cutmix with Beta(cutmix, cutmix), one of the
    two at random when both are on; None when both are off. All draws come from ``generator``."""
    methods = [m for m, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not methods:
        return None
    g = generator
    method = methods[int(torch.randint(len(methods), (1,), generator=g))]
    alpha = mixup if method == "mixup" else cutmix
    # torch's Beta sampler takes no generator: a seed drawn from the generator seeds numpy's Beta
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(shape[0], generator=g)
    if method == "mixup":
        return MixParams(method, perm, lam)
    sizes = shape[2:]
    side = (1 - lam) ** (1 / len(sizes))           # the box's side as a fraction of each axis
    box = []
    for n in sizes:
        w = int(round(n * side))
        start = int(torch.randint(0, n - w + 1, (1,), generator=g))
        box.append((start, start + w))
    area = 1.0
    for (a, b), n in zip(box, sizes):
        area *= (b - a) / n
    return MixParams(method, perm, 1 - area, tuple(box))


def apply_mix(x: torch.Tensor, p: MixParams) -> torch.Tensor:
    """Apply drawn mixing (deterministic): ``lam x + (1 - lam) x[perm]``, or ``x[perm]`` pasted in the box."""
    if p.method == "mixup":
        return p.lam * x + (1 - p.lam) * x[p.perm]
    out = x.clone()
    region = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in p.box)
    out[region] = x[p.perm][region]
    return out
