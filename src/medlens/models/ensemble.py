"""Soft-voting ensembles: k trained members of one registered architecture behind one module.

The members are fitted separately (``train.ensemble``: seeds ``seed .. seed+k-1``, ``medlens.workflow.train``)
and put together here, so a run of an ensemble is one network to everything above the engine: one
``model.pt``, one ONNX export, one ``Predictor``. Its output is the logit of the members' mean probability
(soft voting), so the usual sigmoid/softmax gives that mean.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medlens.models.registry import create_model, register_model

_EPS = 1e-6


class SoftVote(nn.Module):
    """Mean of the members' probabilities (sigmoid or softmax), returned as a logit / log-probability."""

    def __init__(self, members: list[nn.Module], combine: str) -> None:
        super().__init__()
        if combine not in ("sigmoid", "softmax"):
            raise ValueError(f"ensemble combine '{combine}' is not sigmoid or softmax")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x).float() for m in self.members])
        if self.combine == "softmax":
            return torch.log(torch.softmax(logits, dim=-1).mean(0).clamp_min(_EPS))
        p = torch.sigmoid(logits).mean(0).clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p)


@register_model("ensemble", dims=(2, 3))
def ensemble(in_channels: int, num_outputs: int, spatial_dims: int = 2, input_size=None, member: str = "small_cnn",
             member_params: dict | None = None, k: int = 2, combine: str = "sigmoid") -> nn.Module:
    """Soft-voting ensemble of k members of one registered model (train.ensemble builds it from trained members)."""
    if member == "ensemble" or k < 1:
        raise ValueError("an ensemble holds k >= 1 members of another model")
    nets = [create_model(member, in_channels, num_outputs, spatial_dims, input_size, **(member_params or {}))
            for _ in range(int(k))]
    return SoftVote(nets, combine)
