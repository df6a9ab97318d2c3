"""Shared CLI helpers: the console, tables, progress bars, quiet library logging."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

import os
import sys

# Pipes and CI logs get a wide console so tables are never truncated; a terminal keeps its own width.
_width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(width=_width)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def quiet_libraries() -> None:
    # Lightning resets the level of its package loggers when it is imported (after this runs), but not of the
    # child loggers its rank-zero messages go through ("GPU available", the litlogger tip, AMP, fit stopped).
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "nibabel", "pydicom",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from medlens.errors import MedlensWarning

    warnings.filterwarnings("default", category=MedlensWarning)
    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MedlensWarning):
            err_console.print(f"warning: {message}", markup=False, highlight=False)
        else:
            plain(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def quiet_flower(level: int = logging.ERROR) -> None:
    """Flower's console handler shows errors only (its round log and deprecation notices are not medlens's lines)
    and no colour codes unless stderr is a terminal. FLWR_LOG_LEVEL, when set, still chooses the level."""
    import flwr.common.logger as flwr_logger  # importing flwr installs its handler: adjust it after

    flwr_logger.update_console_handler(level=None if os.environ.get("FLWR_LOG_LEVEL") else level,
                                       colored=sys.stderr.isatty())


def progress(transient: bool = True, download: bool = False) -> Progress:
    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn()] if download else [TextColumn("{task.completed}/{task.total}")]
    return Progress(*cols, TimeRemainingColumn(), console=err_console, transient=transient)


@contextmanager
def progress_step(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """One bar (on stderr, gone when done; invisible when stderr is not a terminal) and the ``report(done,
    total=None, what=None)`` callback that library code calls: the bridge from a ``progress`` parameter to the
    console. ``what`` (a phase such as "loading") is shown after the description."""
    with progress() as bar:
        task = bar.add_task(description, total=total)

        def report(done: int, total: int | None = None, what: str | None = None) -> None:
            bar.update(task, completed=done, total=total,
                       description=f"{description}: {what}" if isinstance(what, str) else description)

        yield report
