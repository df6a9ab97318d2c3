"""Data sources (``data.source``): the registry and the built-in sources, which register themselves on import.

To add a source, write one module here with a ``@register_source`` ``DataSource`` subclass and import it below.
"""

from __future__ import annotations

from medlens.data.sources import csv_manifest, folder, medmnist, patch_store  # noqa: F401  (they register)
from medlens.data.sources.registry import (DataSource, get_source, list_sources, register_source, source_for_path,
                                          unregister_source)

__all__ = ["DataSource", "get_source", "list_sources", "register_source", "source_for_path", "unregister_source"]
