"""Shared CLI helpers: the console, tables, progress bars, quiet library logging."""

from __future__ import annotations

import logging
import warnings

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


def progress(transient: bool = True, download: bool = False) -> Progress:
    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn()] if download else [TextColumn("{task.completed}/{task.total}")]
    return Progress(*cols, TimeRemainingColumn(), console=err_console, transient=transient)
