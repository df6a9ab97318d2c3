"""``medlens gateway CONFIG`` (the clinical AI gateway: C-STORE in, results to PACS/EHR) and
``medlens gateway status CONFIG`` (the queue's state)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medlens.cli.common import console


def say(text: str) -> None:
    """One plain line on stdout, never wrapped (one line per outcome, whatever its length)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def gateway(first: str = typer.Argument(..., metavar="CONFIG|status",
                                        help="the gateway YAML, or 'status' followed by it"),
            second: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", show_default=False,
                                                    help="after 'status': the gateway YAML")) -> None:
    """Receive studies (DICOM C-STORE, STOW-RS), route them to runs, send the results (SR/SEG/FHIR) to PACS/EHR.

    `medlens gateway CONFIG` runs until SIGTERM or Ctrl-C and prints one line per series outcome.
    `medlens gateway status CONFIG` shows the durable queue: counts by state, unrouted/refused/failed series
    and deliveries waiting to be retried."""
    from medlens.errors import ConfigError
    from medlens.gateway.config import load_gateway_config

    if first == "status":
        if second is None:
            raise ConfigError("gateway status needs the gateway config: medlens gateway status CONFIG")
        _status(second, load_gateway_config(second))
        return
    if second is not None:
        raise ConfigError(f"unexpected argument {str(second)!r}: medlens gateway CONFIG, or medlens gateway status "
                          "CONFIG")
    _run(Path(first), load_gateway_config(first))


def _run(path: Path, cfg) -> None:
    import signal
    import threading

    from medlens.gateway.service import run_gateway

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def ready(listening) -> None:
        extra = f", metrics at {listening.metrics}" if listening.metrics else ""
        extra += f", STOW-RS at {listening.stow}" if listening.stow else ""
        say(f"gateway listening as {listening.dicom}{extra}")

    try:
        run_gateway(cfg, stop, say=say, ready=ready, source=path)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    say("gateway stopped")


def _status(path: Path, cfg) -> None:
    from medlens.gateway.service import gateway_status

    st = gateway_status(cfg, source=path)
    t = Table(title=f"gateway queue {cfg.queue_path}")
    for c in ("table", "state", "count"):
        t.add_column(c)
    for table, states in st["counts"].items():
        for state, n in states.items():
            t.add_row(table, state, str(n))
    console.print(t)
    for p in st["problems"]:
        where = f" -> {p['run']}" if "run" in p else ""
        dest = f" to {p['destination']} ({p['attempts']} attempt(s))" if "destination" in p else ""
        say(f"{p['what']} {p['id']}{where}{dest}: {p['state']}: {p['reason']}")
