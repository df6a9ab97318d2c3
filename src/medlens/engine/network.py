"""The network a run saves: per-channel normalisation in front of the registered architecture.

Kept apart from the Lightning module (``engine.module``) so that opening and using a trained run
(``medlens.run``) needs torch only, not the training stack.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` stored as buffers, so it travels with the weights."""

    mean: torch.Tensor   # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class ClassifierNet(nn.Module):
    """Normalisation + network: what is saved as ``model.pt`` and what explainers see."""

    def __init__(self, net: nn.Module, mean, std, target: list[float] | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.scaled = target is not None
        if target is not None:   # a numeric target (issue 26): the network learns it standardised, answers in units
            self.register_buffer("target_mean", torch.tensor(float(target[0]), dtype=torch.float32))
            self.register_buffer("target_std", torch.tensor(float(target[1]), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.normalize(x))
        if self.scaled:
            out = out * self.target_std + self.target_mean
        return out
