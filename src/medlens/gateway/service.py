"""``medlens gateway CONFIG``: the receiver and the worker together until a stop is asked (SIGTERM/SIGINT in the
CLI), and ``medlens gateway status CONFIG``: the queue's state read from its file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from medlens.errors import ConfigError
from medlens.gateway.audit import AuditLog, uid_hash
from medlens.gateway.config import GatewayConfig
from medlens.gateway.metrics import GatewayMetrics
from medlens.gateway.queue import Queue
from medlens.gateway.scp import Spool, StoreSCP
from medlens.gateway.status_page import redact, status_router
from medlens.gateway.stow import StowServer
from medlens.gateway.ups import UpsService, UpsWorker
from medlens.gateway.ups import check_config as ups_check
from medlens.gateway.worker import Worker


@dataclass
class Listening:
    dicom: str
    metrics: str | None
    stow: str | None = None


def run_gateway(cfg: GatewayConfig, stop: threading.Event, say: Callable[[str], None] | None = None,
                ready: Callable[[Listening], None] | None = None, source=None) -> None:
    """Open the runs, the queue and the audit log, start the SCP (and the metrics endpoint), then work the queue
    every ``poll_s`` until ``stop`` is set; everything is closed on the way out. Work left in the queue by an
    earlier process (killed or stopped) is taken up first."""
    key = cfg.site_key(source)
    runs = Worker.open_runs(cfg, source)  # before anything is written: a bad run folder is a one-line error
    ups_check(cfg, source)  # so is a bad worklist setting
    queue = Queue(cfg.queue_path)
    audit = AuditLog(cfg.audit, key)
    metrics = GatewayMetrics()
    ups = UpsService(cfg, queue, audit, say, source) if cfg.ups is not None else None  # the AIW-I worklist
    worker = (UpsWorker if ups is not None else Worker)(cfg, queue, audit, metrics, say, runs)
    if isinstance(worker, UpsWorker) and ups is not None:
        worker.ups = ups
    spool = Spool(cfg, queue, audit, metrics)
    scp = StoreSCP(cfg, spool)
    http = stow = sender = None
    try:
        if cfg.stow is not None:  # the serve app (its API keys, limits) with the STOW-RS routes and the status page
            stow = StowServer(cfg, spool, list(runs), source)
            stow.app.include_router(status_router(cfg, queue, worker, key))  # /gateway/status(.json)
        try:
            scp.start()
        except OSError as e:
            raise ConfigError(f"cannot listen for DICOM on {cfg.listen.host}:{cfg.listen.port} ({e.strerror or e})",
                              source) from None
        if ups is not None:
            ups.attach(scp.server)  # UPS Push/Pull/Watch/Query on the same AE, port and allow-list
            sender = ups.start(stop, cfg.poll_s)  # the event reports' sender thread
        shown = None
        if cfg.metrics is not None:
            try:
                http = metrics.serve(cfg.metrics.host, cfg.metrics.port)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} "
                                  f"({e.strerror or e})", source) from None
            shown = f"http://{cfg.metrics.host}:{http[0].server_port}/metrics"
        stow_url = stow.start() if stow is not None else None
        if ready is not None:
            ready(Listening(f"{cfg.listen.ae_title}@{cfg.listen.host}:{cfg.listen.port}", shown, stow_url))
        while not stop.is_set():
            worker.step()
            if ups is not None:
                ups.sync()
            stop.wait(cfg.poll_s)
    finally:
        if stow is not None:
            stow.stop()
        scp.stop()
        if http is not None:
            http[0].shutdown()
        if sender is not None:
            stop.set()  # on an error too: the sender thread stops before the queue closes
            sender.join(timeout=cfg.ups.event_timeout_s * 3 if cfg.ups else 30)
        queue.close()


def gateway_status(cfg: GatewayConfig, source=None) -> dict:
    """Counts by state (series, jobs, deliveries, spooled instances) and the problems (unrouted series, refused
    and failed jobs, deliveries waiting after a failure), series named by their audit-trail hash."""
    key = cfg.site_key(source)
    queue = Queue(cfg.queue_path, readonly=True)
    try:
        counts, problems = queue.counts(), queue.problems()
    finally:
        queue.close()
    for p in problems:
        p["id"] = uid_hash(key, p["id"])[:12]
        p["reason"] = redact(p.get("reason"), key)  # a UID in an error text too
        if "run" in p:
            p["run"] = p["run"].rstrip("/").rsplit("/", 1)[-1]
    return {"counts": counts, "problems": problems}
