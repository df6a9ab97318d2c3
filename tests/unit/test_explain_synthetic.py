"""Attribution methods on synthetic models whose answer is known."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from medlens.engine.module import ClassifierNet
from medlens.errors import ConfigError
from medlens.explain import METHODS, explain
from medlens.explain.methods import NonFiniteMapError


class QuadrantNet(nn.Module):
    """Output depends only on the top-left quadrant of the input (bias-free convs, ReLU, GAP, linear)."""

    def __init__(self, dims: int = 2, size: int = 32):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        torch.manual_seed(0)
        self.features = nn.Sequential(Conv(1, 8, 3, padding=1, bias=False), nn.ReLU(),
                                      Conv(8, 8, 3, padding=1, bias=False), nn.ReLU())
        for m in self.features:
            if isinstance(m, Conv):
                m.weight.data = m.weight.data.abs()
        mask = torch.zeros((1, 1) + (size,) * dims)
        mask[(slice(None), slice(None)) + (slice(0, size // 2),) * dims] = 1
        self.register_buffer("mask", mask)
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(8, 2)
        self.head.weight.data = torch.stack([-torch.ones(8), torch.ones(8)])
        self.head.bias.data.zero_()

    def forward(self, x):
        return self.head(self.pool(self.features(x * self.mask)).flatten(1))


def _net(dims=2, size=32):
    return ClassifierNet(QuadrantNet(dims, size), [0.0], [1.0]).eval()


def _image(n, dims, size):
    """Structured input: each quadrant (octant in 3D) has its own intensity, plus noise (anatomy has edges)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.stack(torch.meshgrid(*[torch.arange(size) >= size // 2] * dims, indexing="ij")).long()
    region = sum(idx[d] * (2 ** d) for d in range(dims))
    levels = torch.tensor([0.85, 0.35, 0.6, 0.2, 0.45, 0.7, 0.3, 0.55])[: 2 ** dims]
    base = levels[region]
    return (base + 0.05 * torch.rand((n, 1) + (size,) * dims, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("method", [m for m, v in METHODS.items() if not v.attention])  # CNN: no attention
def test_maps_concentrate_in_the_only_quadrant_that_matters(method):
    size = 32
    net = _net(2, size)
    x = _image(2, 2, size)
    maps, info = explain(net, x, method, target=1)
    assert maps.shape == (2, size, size) and np.isfinite(maps).all()
    mass = np.abs(maps)
    inside = mass[:, : size // 2 + 2, : size // 2 + 2].sum()  # the quadrant plus the convs' 2-pixel spill
    assert mass.sum() > 0 and inside / mass.sum() > 0.9, f"{method}: {inside / mass.sum():.2f}"


@pytest.mark.parametrize("method", [m for m, v in METHODS.items() if 3 in v.dims and not v.attention])
def test_3d_maps_concentrate_too(method):
    net = _net(3, 16)
    x = _image(1, 3, 16)
    maps, _ = explain(net, x, method, target=1)
    assert maps.shape == (1, 16, 16, 16) and np.isfinite(maps).all()
    mass = np.abs(maps)
    assert mass.sum() > 0 and mass[:, :10, :10, :10].sum() / mass.sum() > 0.9


class SqrtNet(nn.Module):
    """Finite outputs whose input gradient is infinite at zero-valued pixels: d sqrt(x)/dx = 1 / (2 sqrt(x))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.conv(torch.sqrt(x)).mean((2, 3)))


def test_non_finite_maps_are_refused_not_zeroed():
    net = ClassifierNet(SqrtNet(), [0.0], [1.0]).eval()
    x = torch.rand(2, 1, 16, 16) + 0.1
    x[1, 0, 4, 4] = 0.0  # one pixel where the gradient is infinite
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()  # the model itself is fine
    with pytest.raises(NonFiniteMapError, match=r"saliency.*sample\(s\) \[1\]"):
        explain(net, x, "saliency", target=1)
    maps, _ = explain(net, x[:1], "saliency", target=1)  # the finite sample alone is explained
    assert np.isfinite(maps).all() and np.abs(maps).sum() > 0


def test_clear_errors_list_the_valid_choices():
    net = _net()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ConfigError, match="choose one of: gradcam, gradcam\\+\\+"):
        explain(net, x, "gradcan")
    with pytest.raises(ConfigError, match="unknown layer 'features.9'.*features.0"):
        explain(net, x, "gradcam", layer="features.9")
    with pytest.raises(ConfigError, match="out of range"):
        explain(net, x, "saliency", target=5)
    maps, info = explain(net, x, "gradcam", layer="features.2")
    assert info["layer"] == "features.2"
