"""Batch augmentation on tensors, 2D and 3D, reproducible.

Parameters are drawn per sample from a seeded ``torch.Generator`` and applied to the whole batch
at once (one ``affine_grid``/``grid_sample`` call), which on 2 CPU cores is far faster than
per-sample pipelines. The same seed gives the same augmented batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medlens.config import AugmentConfig


class BatchAugment:
    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @property
    def active(self) -> bool:
        return any(float(v) for v in self.cfg.model_dump().values())

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``x`` of shape (B, C, H, W) or (B, C, D, H, W), values in any range."""
        if not self.active:
            return x
        return self.intensity(self.geometric(x, generator), generator)

    def geometric(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flips, 90-degree turns and the affine part: apply to an image and its mask together
        (concatenated along channels) to keep them aligned."""
        c, g = self.cfg, generator
        b, nd = x.shape[0], x.ndim - 2
        rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        if c.hflip:
            m = rand(b) < c.hflip
            x = torch.where(m.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        if c.vflip:
            m = rand(b) < c.vflip
            x = torch.where(m.view(-1, *[1] * (x.ndim - 1)), x.flip(-2), x)
        if c.rot90 and x.shape[-1] == x.shape[-2]:
            k = torch.randint(0, 4, (b,), generator=g)
            x = torch.stack([torch.rot90(x[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
        if c.rotate or c.translate or c.scale:
            x = self._affine(x, b, nd, rand)
        return x

    def intensity(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and noise: images only."""
        c, g = self.cfg, generator
        b = x.shape[0]
        rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        if c.brightness or c.contrast:
            shape = (b, *[1] * (x.ndim - 1))
            mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            gain = 1 + (rand(*shape) * 2 - 1) * c.contrast
            bias = (rand(*shape) * 2 - 1) * c.brightness * (x.amax() - x.amin()).clamp_min(1e-6)
            x = (x - mean) * gain + mean + bias
        if c.noise:
            sigma = rand(b, *[1] * (x.ndim - 1)) * c.noise * x.std().clamp_min(1e-6)
            x = x + sigma * torch.randn(x.shape, generator=g)
        return x

    def _affine(self, x, b, nd, rand):
        c = self.cfg
        ang = (rand(b) * 2 - 1) * math.radians(c.rotate)
        scale = 1 + (rand(b) * 2 - 1) * c.scale
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        if nd == 2:
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            theta[:, :, 2] = (rand(b, 2) * 2 - 1) * 2 * c.translate
        else:  # rotate in-plane (about the slice axis), scale and translate in 3D
            theta = torch.zeros(b, 3, 4)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            theta[:, 2, 2] = 1 / scale
            theta[:, :, 3] = (rand(b, 3) * 2 - 1) * 2 * c.translate
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
