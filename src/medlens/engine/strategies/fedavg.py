"""FedAvg (McMahan et al., 2017), Flower's ``FedAvg``."""

from __future__ import annotations

from flwr.server.strategy import FedAvg

from medlens.engine.strategies.registry import StrategySettings, register_strategy


@register_strategy("fedavg")
def fedavg(settings: StrategySettings):
    """FedAvg: the sites' weights averaged, each weighted by its number of training cases."""
    return FedAvg, {}
