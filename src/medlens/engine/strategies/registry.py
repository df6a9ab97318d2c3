"""Federated strategy registry: the server's aggregation rules register by name, ``medlens federate
--strategy NAME`` picks one.

timm's pattern, as the model registry: each strategy is one module of ``medlens.engine.strategies`` that
imports this registry and registers into it; the registry imports none of them. The package imports every
module it holds, so a new strategy is one new file (and its test), with no edit anywhere else.

A strategy's builder takes the federation's ``StrategySettings`` and returns a Flower strategy class of the
FedAvg family (``flwr.server.strategy.FedAvg`` or a subclass) with the keyword arguments of its own on top
of FedAvg's. ``workflow.federate.make_strategy`` puts the checks every result goes through before it is
aggregated (authentication, finite weights, norm bound) around that class, whichever it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medlens.errors import ConfigError
from medlens.utils import did_you_mean


@dataclass(frozen=True)
class StrategySettings:
    """What the federation passes to a strategy's builder (each builder takes what it needs)."""

    proximal_mu: float = 0.01   # FedProx: weight of ``mu/2 * ||w - w_global||^2`` in the sites' local loss
    server_lr: float = 0.01     # FedAdam (and other FedOpt strategies): the server's step size


#: a builder: settings -> (Flower strategy class, keyword arguments besides FedAvg's)
StrategyBuilder = Callable[[StrategySettings], "tuple[type, dict[str, Any]]"]


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    build: StrategyBuilder
    summary: str


_REGISTRY: dict[str, StrategyEntry] = {}


def register_strategy(name: str | None = None):
    """Decorator: register a builder ``f(settings: StrategySettings) -> (strategy_class, kwargs)`` under
    ``name`` (default: the function's name). The first line of its docstring is its summary."""

    def deco(fn: StrategyBuilder) -> StrategyBuilder:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"federated strategy '{key}' registered twice")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _REGISTRY[key] = StrategyEntry(key, fn, doc[0] if doc else "")
        return fn

    return deco


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (a test's toy strategy, when the test ends)."""
    _REGISTRY.pop(name, None)


def list_strategies() -> list[str]:
    return list(_REGISTRY)


def get_strategy(name: str) -> StrategyEntry:
    """The registered strategy ``name``; one line naming the known ones (and the closest) otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"--strategy '{name}' is not one of {', '.join(_REGISTRY)}{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]
