"""Shared CLI helpers: the console, tables, progress bars, quiet library logging, and the plan printout that
``plan`` and ``train --auto`` share.

Like every module of ``medlens.cli`` it imports only the standard library, typer and rich at module level
(docs/ARCHITECTURE.md, "Imports"); a helper that needs more imports it in its body.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:  # types only: nothing is imported at run time
    from medlens.config import ExperimentConfig

# Pipes and CI logs get a wide console so tables are never truncated; a terminal keeps its own width.
_width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(width=_width)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# context settings of the commands that also answer -h (federate, pretrain)
SHORT_HELP: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


def say(text: str) -> None:
    """One plain line on stdout: no rich markup or highlighting of what the library wrote."""
    console.print(text, markup=False, highlight=False)


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

    chosen = None if os.environ.get("FLWR_LOG_LEVEL") else level
    flwr_logger.update_console_handler(level=chosen, colored=sys.stderr.isatty())
    if chosen is not None:
        # the logger's own level too: Flower's simulation resets its console handler's level when it starts
        flwr_logger.FLOWER_LOGGER.setLevel(chosen)


def progress(transient: bool = True, download: bool = False) -> Progress:
    cols: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
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


def print_plan(cfg: ExperimentConfig, out: Path | None) -> None:
    """The decisions of a plan (``medlens plan``, ``train --auto``), one line each, and where the plan went."""
    p = cfg.plan
    if p is None:
        from medlens.errors import ConfigError

        raise ConfigError("the config has no plan: section (write one with `medlens plan`)", out)
    t = Table(title=f"plan for {p['input']} (budget {p['budget']})")
    for col in ("setting", "value", "reason"):
        t.add_column(col, overflow="fold")
    for d in p["decisions"]:
        v = d["value"]
        t.add_row(d["setting"], str(v if not isinstance(v, dict) else {k: v[k] for k in v}), d["reason"])
    console.print(t)
    e = p["estimates"]
    say(f"estimated {e['total_s']:.0f}s of {p['budget_seconds']:.0f}s (fitting {e['fit_s']:.0f}s, "
        f"evaluation {e['post_s']:.0f}s, margin {e['margin_s']:.0f}s)")
    if out is not None:
        say(f"plan: {out}")
