"""Federated strategies (the server's aggregation rule), one module each, registered by name in
``registry``. Every module of this package is imported here, so that a new strategy is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from medlens.engine.strategies.registry import (
    StrategyEntry,
    StrategySettings,
    get_strategy,
    list_strategies,
    register_strategy,
    unregister_strategy,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "registry":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["StrategyEntry", "StrategySettings", "get_strategy", "list_strategies", "register_strategy",
           "unregister_strategy"]
