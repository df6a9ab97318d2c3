"""Feature views for any 2D/3D CNN: first-layer filters and each conv layer's feature maps for one input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medlens.explain.layers import conv_layers
from medlens.evaluation.plots import grid_png


def first_layer_filters(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The first convolution's kernels as (n_filters, kh, kw) (channel-averaged; 3D: the middle slice)."""
    _, conv = conv_layers(net, x[:1])[0]
    w = conv.weight.detach().float()
    w = w.mean(1)  # over input channels
    if w.ndim == 4:  # 3D kernels: middle slice
        w = w[:, w.shape[1] // 2]
    return w.numpy()


def feature_maps(net: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Output of every convolution for one input: name -> (channels, *spatial)."""
    out: dict[str, np.ndarray] = {}

    def keep(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            out[name] = output[0].detach().float().numpy()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in conv_layers(net, x[:1])]
    try:
        with torch.no_grad():
            net.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return out


def write_feature_views(net: torch.nn.Module, x: torch.Tensor, out_dir: str | Path, max_maps: int = 32) -> list[Path]:
    """PNG grids: ``filters.png`` and ``featuremaps_<layer>.png`` for each conv layer (3D: middle slice)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [grid_png(first_layer_filters(net, x), out_dir / "filters.png", "first-layer filters")]
    for name, fm in feature_maps(net, x).items():
        if fm.ndim == 4:
            fm = fm[:, fm.shape[1] // 2]
        paths.append(grid_png(fm[:max_maps], out_dir / f"featuremaps_{name.replace('.', '_')}.png",
                              f"feature maps: {name} ({fm.shape[0]} channels, {fm.shape[1]}x{fm.shape[2]})"))
    return paths
