"""Model registry: architectures register by name, configs name them, ``medlens models list`` shows them.

timm's pattern: the architecture modules import this registry and register into it; the registry imports
none of them. ``medlens.models`` (the package) imports the architecture modules, so anything that
imports ``medlens.models`` sees every model.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from medlens.errors import ConfigError
from medlens.utils import did_you_mean


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    dims: tuple[int, ...]
    task: str
    summary: str
    min_size: int | None = None  # the smallest input side the architecture takes (its pooling stages); None: any

    @property
    def params(self) -> list[str]:
        return [p for p in inspect.signature(self.factory).parameters]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str | None = None, *, dims: tuple[int, ...] = (2,), task: str = "classification",
                   min_size: int | None = None):
    """Decorator: register a factory ``f(in_channels, num_outputs, spatial_dims=..., **kw) -> nn.Module``.

    The first line of the factory's docstring is the summary shown by ``medlens models list``. ``min_size``: the
    smallest input side the architecture takes; ``create_model`` refuses a smaller ``input_size`` in one line
    before any network is built (a factory whose minimum depends on its options checks with ``check_min_size``).
    """

    def deco(fn: Callable[..., nn.Module]):
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model '{key}' registered twice")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _REGISTRY[key] = ModelEntry(key, fn, tuple(dims), task, doc[0] if doc else "", min_size)
        return fn

    return deco


def list_models(pattern: str = "*") -> list[ModelEntry]:
    return [e for k, e in sorted(_REGISTRY.items()) if fnmatch.fnmatch(k, pattern)]


def get_model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'{did_you_mean(name, _REGISTRY)}; see `medlens models list`")
    return _REGISTRY[name]


def check_min_size(name: str, low: int | None, input_size) -> None:
    """Refuse, in one line naming the model, its minimum and the configured size, an input side below ``low``."""
    if low is not None and input_size is not None and min(input_size) < low:
        given = "x".join(str(int(v)) for v in input_size)
        raise ConfigError(f"model '{name}' needs inputs of at least {low} px per side; the configured input size is "
                          f"{given} (data.size): set data.size to {low} or more, or choose another model")


def create_model(name: str, in_channels: int, num_outputs: int, spatial_dims: int = 2,
                 input_size: tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model; unknown keyword arguments are a config error, not a crash."""
    entry = get_model_entry(name)
    if spatial_dims not in entry.dims:
        dims = "/".join(f"{d}D" for d in entry.dims)
        raise ConfigError(f"model '{name}' supports {dims} inputs, the data is {spatial_dims}D")
    sig = inspect.signature(entry.factory)
    accepts_var = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    bad = [k for k in kwargs if k not in sig.parameters and not accepts_var]
    if bad:
        raise ConfigError(f"model '{name}' has no option(s) {bad}; it takes {entry.params[2:]}")
    check_min_size(name, entry.min_size, input_size)
    extra = {}
    if "spatial_dims" in sig.parameters:
        extra["spatial_dims"] = spatial_dims
    if "input_size" in sig.parameters:
        extra["input_size"] = input_size
    return entry.factory(in_channels, num_outputs, **extra, **kwargs)
