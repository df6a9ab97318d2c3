"""Choosing the layer an activation-based method (CAM family) explains."""

from __future__ import annotations

import torch
import torch.nn as nn

from medlens.errors import ConfigError


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple, int]]:
    """Modules in execution order with their output shape and how often they ran."""
    order: list[str] = []
    shapes: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, inp, out, name=name):
            if isinstance(out, torch.Tensor):
                if name not in calls:
                    order.append(name)
                calls[name] = calls.get(name, 0) + 1
                shapes[name] = tuple(out.shape)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    mods = dict(model.named_modules())
    return [(n, mods[n], shapes[n], calls[n]) for n in order]


def conv_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d | nn.Conv3d]]:
    """Convolution modules in execution order (for feature-map views)."""
    return [(n, m) for n, m, shape, _ in _trace(model, x) if isinstance(m, (nn.Conv2d, nn.Conv3d))]


def find_target_layer(model: nn.Module, x: torch.Tensor, name: str | None = None,
                      strip: str = "") -> tuple[str, nn.Module]:
    """The named layer, or by default the last spatial block: the module the model marks ``cam_target``
    (the ViT's patch-token grid), else the last module (in execution order) whose output is a spatial map
    with more than one voxel; a module that runs several times per forward pass (a shared ReLU) is
    replaced by its enclosing block."""
    trace = _trace(model, x)
    mods = dict(model.named_modules())
    valid = [n for n, _, shape, _ in trace if len(shape) == x.ndim and max(shape[2:]) > 1 and n != ""]
    shown = ", ".join(v.removeprefix(strip) for v in valid[-12:] if v.startswith(strip))
    if name is not None:
        if name not in mods:
            raise ConfigError(f"unknown layer '{name.removeprefix(strip)}'; spatial layers of this model: {shown}")
        if name not in valid:
            raise ConfigError(f"layer '{name.removeprefix(strip)}' has no spatial output; choose one of: {shown}")
        return name, mods[name]
    if not valid:
        raise ConfigError("this model has no spatial layer to explain")
    marked = [n for n in valid if getattr(mods[n], "cam_target", False)]  # a model's declared CAM layer (ViT)
    if marked:
        return marked[-1], mods[marked[-1]]
    last = valid[-1]
    calls = {n: c for n, _, _, c in trace}
    while calls.get(last, 1) > 1 and "." in last:
        last = last.rsplit(".", 1)[0]
    return last, mods[last]
