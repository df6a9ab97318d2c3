"""The life of a run folder, shared by every command that writes one (``train`` for classifiers, segmentation,
anomaly and ensembles, ``federate`` in simulation and as a server).

- **open**: ``RunStart(path, resume=..., overwrite=...)`` refuses, before anything is written, what the folder
  rules forbid (``run.RunFolder.check``); entered, it holds the folder's lock (a second writer gets one line)
  and makes the folder ready: marker, emptied on ``--overwrite``, kept on ``--resume``.
- **load**: ``loading(progress)`` hands the data loaders a callback that reports to the caller's
  ``progress(done, total, "loading")`` (each file read; a folder already split into train/val/test reports each
  split), then ``progress(1, 1, "loaded")`` once the data are in memory: a caller's loading bar ends there, before
  the fit (which shows Lightning's own).
- **start**: ``write_start`` writes ``config.yaml`` and ``run.json`` with status ``training`` before fitting:
  a folder whose process died says so (predict, serve and export refuse it without ``--allow-incomplete``).
- **finish**: ``finish`` sets the status (``complete``, or ``failed`` when the result is no result), writes
  ``run.json``, hands the run to the evaluation (metrics, predictions, the report's sections) and writes the
  report last, so the report shows what the evaluation wrote.

Every file goes through a temporary name and a rename (``utils.write_text_atomic``, ``atomic_path``): a
reader never sees half a file, whatever happens to the writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd
import torch

from medlens.config import ExperimentConfig, dump_config
from medlens.report.html import write_report
from medlens.run import Run, RunFolder, RunMeta, run_lock
from medlens.utils import atomic_path, write_json_atomic, write_text_atomic

R = TypeVar("R")

#: a long step's report to its caller: ``progress(done, total, what)`` (the CLI passes ``cli.common.progress_step``)
Progress = Callable[[int, int, str], None]


def resolve_run_dir(cfg: ExperimentConfig, run_dir: str | Path | None) -> Path:
    """``--run-dir`` if given, else ``<output_dir>/<name>``."""
    return Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name


class RunStart:
    """Open a run folder for writing: checked at construction (nothing written), locked and prepared inside
    the ``with`` block, whose value is True when training continues from a checkpoint."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self.folder = RunFolder(self.path)
        self.folder.check(resume, overwrite)
        self._held = ExitStack()

    def __enter__(self) -> bool:
        with ExitStack() as stack:  # the lock is let go if preparing fails
            stack.enter_context(run_lock(self.path))
            from_checkpoint = self.folder.prepare(self.resume, self.overwrite)
            self._held = stack.pop_all()
        return from_checkpoint

    def __exit__(self, *exc: object) -> None:
        self._held.close()


@contextmanager
def loading(progress: Progress | None) -> Iterator[Callable[[int, int], None] | None]:
    """The loaders' ``(done, total)`` callback for ``progress`` (None without one): each step is reported as
    ``(done, total, "loading")``, and ``(1, 1, "loaded")`` when the block ends with the data in memory."""
    if progress is None:
        yield None
        return
    yield lambda done, total: progress(done, total, "loading")
    progress(1, 1, "loaded")


def write_start(cfg: ExperimentConfig, meta: RunMeta, path: Path) -> None:
    """``config.yaml`` and ``run.json`` (status ``training``) before the fit."""
    write_text_atomic(path / "config.yaml", dump_config(cfg))
    meta.status = "training"
    meta.save(path)


def save_weights(path: Path, net: torch.nn.Module) -> Path:
    """``model.pt`` (a state dict, read back with ``weights_only=True``), written atomically."""
    with atomic_path(path / "model.pt") as tmp:
        torch.save(net.state_dict(), tmp)
    return path / "model.pt"


def write_table(path: Path, table: pd.DataFrame) -> Path:
    """A CSV (``history.csv``) written atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def write_record(path: Path, data: Any) -> Path:
    """A JSON record (``member.json``, ``federated.json``, ``anomaly_scores.json``) written atomically."""
    return write_json_atomic(path, data)


def finish(run: Run, evaluate: Callable[[Run], R],
           status: Literal["complete", "failed"] = "complete") -> R:
    """Mark ``run`` finished (``status``; ``run.json`` written), hand it to ``evaluate`` (which writes metrics,
    predictions and report sections), then write the report; returns what ``evaluate`` returned."""
    run.meta.status = status
    run.save_meta()
    out = evaluate(run)
    write_report(run)
    return out
