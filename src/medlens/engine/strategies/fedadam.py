"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"), Flower's ``FedAdam``."""

from __future__ import annotations

from flwr.server.strategy import FedAdam

from medlens.engine.strategies.registry import StrategySettings, register_strategy


@register_strategy("fedadam")
def fedadam(settings: StrategySettings):
    """FedAdam: the averaged update applied by a server-side Adam step (step size ``server_lr``)."""
    return FedAdam, {"eta": settings.server_lr, "eta_l": settings.server_lr, "tau": 1e-3}
