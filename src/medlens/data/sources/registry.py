"""Data-source registry: each kind of ``data.source`` is one registered ``DataSource``.

timm's pattern, as ``medlens.models.registry``: the source modules (``medmnist``, ``folder``, ``csv``,
``hdf5``) import this registry and register into it with ``@register_source``; the registry imports none of
them. ``medlens.data.sources`` (the package) imports them, so anything that imports ``medlens.data`` sees
every source. An entry decides what the code used to decide by comparing ``data.source`` with names:
how its config section is checked, how splits (and segmentation pairs) load, which stored file the planner
fingerprints, what the run's input profile knows from the source, which patients a run trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from medlens.errors import ConfigError
from medlens.utils import did_you_mean


class DataSource:
    """One kind of ``data.source``. Subclass it, set ``name`` and register it with ``@register_source``.

    The class attributes state the config rules shared by several sources; ``check`` adds the source's own.
    Every hook receives the run's ``DataConfig``.
    """

    name: str = ""
    summary: str = ""
    needs_path: bool = True          # data.path is required
    reads_files: bool = False        # image files prepared as they load (data.clahe/data.window apply; prepare=)
    pairs: bool = False              # image + mask pairs for segmentation (``pair_rows``)
    holds_out_patient: bool = False  # data.test_patient names a patient to hold out as the test split
    subgroups: bool = False          # evaluation.subgroups names columns of its manifest
    label_columns: bool = False      # data.label_columns (multi-label) and data.target_column (regression) apply
    plan_suffixes: tuple[str, ...] = ()  # files `medlens plan FILE` reads as this source (".csv")
    plan_folder: bool = False        # `medlens plan FOLDER` reads a folder as this source

    def check(self, cfg, task) -> None:
        """The source's own config rules (``cfg`` is the ``DataConfig``, ``task`` the config's ``Task``);
        raise ``ValueError`` with a message that names the field."""

    def load(self, cfg, *, seed: int, prepare, progress: Callable | None) -> Any:
        """The train/val/test ``SplitData`` of this source (``cfg.resolved_path()`` expanded)."""
        raise NotImplementedError

    def pair_rows(self, cfg) -> list:
        """Segmentation rows ``(image, mask, reference or None, patient id or None)``."""
        raise ConfigError(f"data.source '{self.name}' holds no image + mask pairs")

    def plan_section(self, path: str) -> dict:
        """The ``data:`` section of a fresh config around a file or folder handed to ``medlens plan``."""
        return {"source": self.name, "path": path}

    def stored_file(self, cfg) -> Path | None:
        """The one file that holds the prepared arrays (the planner's fingerprint records its hash), if any."""
        return None

    def for_plan(self, cfg):
        """The ``DataConfig`` the planner loads (e.g. colour read from the stored file)."""
        return cfg

    def profile_hints(self, train, cfg) -> tuple[str | None, bool | None] | None:
        """``(modality, colour)`` that the source itself knows for the run's input profile; ``None``: read
        them from the image files as loaded."""
        return None

    def training_patients(self, cfg) -> set[str]:
        """Patient ids a run of this source trained and validated on (for "seen in training" warnings)."""
        return set()


S = TypeVar("S", bound=DataSource)
_REGISTRY: dict[str, DataSource] = {}


def register_source(cls: type[S]) -> type[S]:
    """Class decorator: register one instance of a ``DataSource`` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"data source '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_source(name: str) -> None:
    """Remove a registered source (tests that register a toy source)."""
    _REGISTRY.pop(name, None)


def list_sources() -> list[DataSource]:
    return [e for _, e in sorted(_REGISTRY.items())]


def source_for_path(path: Path) -> DataSource | None:
    """The source that reads a file (by suffix) or folder handed to ``medlens plan``, if one does."""
    suffix = path.suffix.lower()
    for entry in list_sources():
        if (entry.plan_folder and path.is_dir()) or (not path.is_dir() and suffix in entry.plan_suffixes):
            return entry
    return None


def get_source(name: str) -> DataSource:
    """The registered source, or a one-line ``ConfigError`` with the closest name ("did you mean")."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown data source '{str(name)[:80]}'{did_you_mean(name, _REGISTRY)}; expected one of "
                          f"{sorted(_REGISTRY)}")
    return _REGISTRY[name]
