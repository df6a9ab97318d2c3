"""Transfer learning from a local weights file, with layer freezing."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from medlens.errors import ConfigError, DataError


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; accepts Lightning checkpoints and ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.exists():
        raise DataError("weights file not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"not a loadable weights file ({type(e).__name__}: {str(e).splitlines()[0]})", path) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError("file does not hold a state dict of tensors", path)
    return obj


def _has_frozen_statistics(m: nn.Module) -> bool:
    params = list(m.parameters(recurse=False))
    return (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and bool(params)
            and not any(p.requires_grad for p in params))


def freeze_norm_statistics(net: nn.Module) -> int:
    """Put every frozen normalisation layer of ``net`` in eval mode; return how many.

    A BatchNorm (or InstanceNorm with running statistics) layer is frozen when it has affine parameters
    and none of them requires a gradient. In train mode such a layer would still update its
    ``running_mean``/``running_var`` from each batch, so "frozen" layers would drift. Call this after
    every ``net.train()`` (the Lightning module does so in ``train()`` and ``on_train_start``).
    Layers without affine parameters (``affine=False``) are left alone: nothing marks them frozen.
    """
    frozen = [m for m in net.modules() if _has_frozen_statistics(m)]
    for m in frozen:
        m.eval()
    return len(frozen)


def _strip(key: str) -> str:
    for prefix in ("model.net.", "net.", "model.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def adapt_input_channels(src: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A first-layer convolution weight from an RGB model for a one-channel model (the RGB filters summed,
    which gives a gray image the response the RGB model gives its gray replica), or the reverse (the
    filter split in three); None when the shapes differ otherwise."""
    if src.ndim < 3 or src.ndim != own.ndim or src.shape[0] != own.shape[0] or src.shape[2:] != own.shape[2:]:
        return None
    if src.shape[1] == 3 and own.shape[1] == 1:
        return src.sum(dim=1, keepdim=True)
    if src.shape[1] == 1 and own.shape[1] == 3:
        return src.repeat(1, 3, *[1] * (src.ndim - 2)) / 3
    return None


def apply_transfer(net: nn.Module, weights: str | Path | None, freeze: list[str]) -> dict:
    """Load matching tensors from ``weights`` (same name and shape) and freeze parameters.

    Names are matched as saved (torchvision's ImageNet layout for ``vgg16``/``inception_v3``), after
    stripping ``model.``/``net.``/``module.`` prefixes. A convolution weight that differs only in its input
    channels (RGB weights, one-channel data, or the reverse) is adapted (``adapt_input_channels``) and
    listed under ``adapted``; other tensors whose name or shape differ (a 1000-class output layer) are
    skipped and listed.

    ``freeze`` lists parameter-name prefixes; ``["backbone"]`` freezes everything except the
    final classification layer (the last ``Linear`` module). Frozen BatchNorm layers must also keep
    their running statistics: ``freeze_norm_statistics`` puts them in eval mode after ``train()``.
    """
    loaded, skipped, adapted = 0, [], []
    if weights:
        src = {_strip(k): v for k, v in load_state_dict_file(weights).items()}
        own = net.state_dict()
        take = {}
        for k, v in src.items():
            if k in own and own[k].shape == v.shape:
                take[k] = v
            elif k in own and (a := adapt_input_channels(v, own[k])) is not None:
                take[k] = a
                adapted.append(k)
            else:
                skipped.append(k)
        if not take:
            raise ConfigError(f"no tensor in {weights} matches the model (names or shapes differ)")
        net.load_state_dict(take, strict=False)
        loaded = len(take)
    frozen = 0
    if freeze:
        prefixes = list(freeze)
        if "backbone" in prefixes:
            last = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            if not last:
                raise ConfigError("freeze: backbone needs a model with a final Linear layer")
            head = last[-1]
            for n, p in net.named_parameters():
                if not n.startswith(head + "."):
                    p.requires_grad_(False)
                    frozen += 1
        else:
            names = [n for n, _ in net.named_parameters()]
            for pre in prefixes:
                if not any(n.startswith(pre) for n in names):
                    raise ConfigError(f"freeze prefix '{pre}' matches no parameter (e.g. {names[0]})")
            for n, p in net.named_parameters():
                if any(n.startswith(pre) for pre in prefixes):
                    p.requires_grad_(False)
                    frozen += 1
    return {"weights": str(weights) if weights else None, "loaded": loaded, "adapted": adapted[:20],
            "n_skipped": len(skipped), "skipped": skipped[:20],
            "frozen": frozen, "freeze": list(freeze)}
