"""YAML read with a bounded loader: a document whose alias-expanded size passes ``$MEDLENS_YAML_MAX_NODES``
nodes (a "billion laughs" bomb) is refused before it is built. Configs, step files and routing rules are read
through ``safe_load_yaml``; this module needs only PyYAML, so the commands that read a small YAML file (``medlens
process --steps file.yaml``) do not load the configuration's model and data registries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medlens.errors import ConfigError
from medlens.utils import positive_int_env

YAML_MAX_NODES_ENV = "MEDLENS_YAML_MAX_NODES"
DEFAULT_YAML_MAX_NODES = 100_000  # a real config has a few hundred nodes


def yaml_max_nodes() -> int:
    """The node limit of config YAML: ``$MEDLENS_YAML_MAX_NODES`` or 100,000."""
    return positive_int_env(YAML_MAX_NODES_ENV) or DEFAULT_YAML_MAX_NODES


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Refuse a node graph whose size, with every alias expanded, passes ``limit`` (or that is cyclic).

    Aliases make the composed graph a DAG: each node's expanded size is computed once (memoised),
    so the check is linear in the file, however large the expansion would be.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("YAML holds a recursive alias (a node that contains itself)")
        active.add(key)
        total = 1
        for child in _children(node):
            total += size(child)
            if total > limit:
                raise ConfigError(f"YAML expands to more than {limit:,} nodes through aliases/merges "
                                  f"(an alias bomb?); raise ${YAML_MAX_NODES_ENV} if this is intended")
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks the alias-expanded size of a document before building it."""

    max_nodes: int = DEFAULT_YAML_MAX_NODES

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node, self.max_nodes)
        return super().construct_document(node)


def safe_load_yaml(text: str, source: str | Path | None = None) -> Any:
    """``yaml.safe_load`` with alias-expansion and nesting limits; any problem is one ConfigError line."""
    loader = BoundedSafeLoader(text)
    loader.max_nodes = yaml_max_nodes()
    try:
        return loader.get_single_data()
    except ConfigError as e:
        raise ConfigError(str(e), source) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({str(e).splitlines()[0]})", source) from None
    except RecursionError:
        raise ConfigError("YAML is nested too deeply", source) from None
    finally:
        loader.dispose()
