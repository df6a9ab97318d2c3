"""FedProx (Li et al., 2020), Flower's ``FedProx``: FedAvg's aggregation; the server sends ``proximal_mu``
and each site adds ``mu/2 * ||w - w_global||^2`` to its local loss (``engine.federated.local_fit``)."""

from __future__ import annotations

from flwr.server.strategy import FedProx

from medlens.engine.strategies.registry import StrategySettings, register_strategy


@register_strategy("fedprox")
def fedprox(settings: StrategySettings):
    """FedProx: FedAvg with a proximal term that keeps each site's step near the global model."""
    return FedProx, {"proximal_mu": settings.proximal_mu}
