"""Export formats by name: each format module registers its ``Exporter`` here; this module imports none of them.

timm's pattern, as ``medlens.models.registry``: ``@register_exporter`` on an ``Exporter`` subclass adds one
instance under its ``name``; ``get_exporter(name)`` finds it (an unknown name is one line with "did you mean");
``medlens.run.exporters`` (the package) imports the built-in formats (ONNX, TorchScript), so anything that
imports the package sees them. A new format is one new module plus a test, nothing else.

Also here, because they hold for every format: which files an export leaves (``clean_stale_temps``), the
SHA-256 record in run.json (``record_exports``), and ``open_exported_run``, the one way an exported file is
loaded back as a run's network: the file must be the one ``medlens export`` wrote for this run (its SHA-256 is
the one run.json records, made from the run's current weights), and the format's ``check`` hook must accept it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, TypeVar

from medlens.errors import ConfigError, DataError, MedlensError
from medlens.utils import did_you_mean
from medlens.run.exporters.base import Exporter, export_dir, sha256_of
from medlens.run.meta import ExportRecord, RunMeta
from medlens.run.run import Run

T = TypeVar("T", bound=Exporter)

_REGISTRY: dict[str, Exporter] = {}


def register_exporter(cls: type[T]) -> type[T]:
    """Class decorator: register one instance of an ``Exporter`` subclass under its ``name``."""
    if not cls.name or not cls.file_name:
        raise ValueError(f"{cls.__name__}: an exporter needs a name and a file_name")
    if cls.name in _REGISTRY:
        raise ValueError(f"export format '{cls.name}' registered twice")
    taken = {f for e in _REGISTRY.values() for f in e.files()}
    mine = set(cls().files())
    if taken & mine:
        raise ValueError(f"export format '{cls.name}' writes {sorted(taken & mine)}, which another format writes")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_exporter(name: str) -> None:
    """Remove a format (tests register toy formats and remove them again)."""
    _REGISTRY.pop(name, None)


def list_exporters() -> list[Exporter]:
    """The registered formats, in registration order (``serve --backend auto`` tries them in this order)."""
    return list(_REGISTRY.values())


def get_exporter(name: str) -> Exporter:
    """The format called ``name``; an unknown name is a one-line ``ConfigError`` with "did you mean"."""
    if name not in _REGISTRY:
        raise ConfigError(f"--format must be one of {', '.join(_REGISTRY)}, not '{name}'{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]


def quantization_kinds() -> list[str]:
    """Every ``--quantize`` kind some registered format offers."""
    return sorted({k for e in _REGISTRY.values() for k in e.quantizations})


def report_path(run_dir: str | Path, fmt: str = "onnx") -> Path:
    """``export-onnx.json`` / ``export-torchscript.json``: parity, quantisation and the metadata written."""
    return export_dir(run_dir) / f"export-{fmt}.json"


def _temp_pattern(name: str) -> re.Pattern:
    """The hidden temporary name ``utils.atomic_path`` gives ``name`` (``.model.onnx.<random>.tmp.onnx``)."""
    suffixes = "".join(Path(name).suffixes)
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffixes)}")


def clean_stale_temps(out_dir: Path) -> list[str]:
    """Remove what an export killed half-way left in ``out_dir``: only medlens's own temporary names of the
    export files (of every registered format), only there (call it holding the run's lock, so no export is
    writing them)."""
    names = [f for e in _REGISTRY.values() for f in e.files()]
    names += [report_path(out_dir.parent, e.name).name for e in _REGISTRY.values()]
    patterns = [_temp_pattern(n) for n in names]
    removed = []
    for f in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if any(pt.fullmatch(f.name) for pt in patterns) and (f.is_symlink() or f.is_file()):
            f.unlink()
            removed.append(f.name)
    return removed


def record_exports(run: Run, files: dict[str, tuple[Path, str | None]]) -> None:
    """Write the SHA-256 of each exported file (name -> (path, ``RunMeta.exports`` key)) into run.json
    (atomically; under the run's lock). Files of a format without a record key are not recorded."""
    meta = RunMeta.load(run.dir)
    exports: dict[Any, ExportRecord] = dict(meta.exports or {})   # keys: the formats' record keys
    for name, (path, key) in files.items():
        if key is not None:
            exports[key] = ExportRecord(file=name, sha256=sha256_of(path), bytes=path.stat().st_size,
                                        weights_sha256=run.weights_sha256)
    meta.exports = exports
    meta.save(run.dir)
    run.meta.exports = exports


def open_exported_run(run_dir: str | Path, fmt: str, path: str | Path | None = None,
                      threads: int | None = None) -> Run:
    """The run with its exported ``fmt`` model attached (``Predictor(run)`` then runs the format's runtime).

    The file must be the one ``medlens export`` wrote for this run: its SHA-256 is the one run.json records,
    it was made from the run's current weights, and the format's ``check`` hook accepts it (for ONNX: the
    graph's input and output shapes fit the run and its metadata names the run's weights)."""
    exporter = get_exporter(fmt)
    run = Run.open(run_dir)
    p = Path(path) if path else export_dir(run_dir) / exporter.file_name
    if not p.is_file():
        raise MedlensError(f"no exported model {p.name}; run `medlens export {run_dir} --format {fmt}` first", p.parent)
    key = exporter.files().get(p.name)
    recorded: dict[Any, ExportRecord] = dict(run.meta.exports or {})
    record = recorded.get(key) if key else None
    if record is None:
        raise MedlensError(f"run.json records no SHA-256 for {p.name} (exported by an older medlens, or not by "
                           f"medlens); run `medlens export {run_dir} --format {fmt}` again", p)
    size = p.stat().st_size
    if exporter.max_bytes is not None and size > exporter.max_bytes:
        raise DataError(f"{size:,} bytes, over the {exporter.max_bytes:,} one {exporter.label or fmt} file can hold", p)
    data = p.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise MedlensError("the exported model is not the file `medlens export` wrote for this run (its SHA-256 "
                           "differs from the one run.json records); export again", p)
    if record.weights_sha256 != run.weights_sha256:
        raise MedlensError("the exported model was made from other weights than this run's model.pt; export again",
                           p)
    net = exporter.load(p, run, threads=threads, data=data)
    exporter.check(net, run, str(p))
    return run.use_model(net)
