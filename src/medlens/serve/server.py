"""The server process of ``medlens serve``: uvicorn with a guard on the request headers, TLS checked before
start-up, JSON logs, and the upload spool folders of dead processes cleaned."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from medlens.errors import ConfigError
from medlens.serve.app import create_app
from medlens.serve.inputs import remove_own_spool, remove_stale_spools
from medlens.serve.logs import configure, log
from medlens.serve.settings import ServeSettings, check_binding, is_local

MAX_HEADER_BYTES = 64 * 1024


def header_guard(read_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES):
    """uvicorn's HTTP protocol (httptools or h11, as uvicorn picks) with a deadline and a size bound on the
    request headers: a connection that has not sent a complete request head within ``read_timeout_s`` of
    opening (or of its previous answer, on keep-alive), or sends more than ``max_header_bytes`` of it, is
    closed. uvicorn has a keep-alive timeout but none for the header phase (a slow-header client is otherwise
    held for ever), and its httptools parser has no header size limit."""
    class HeaderGuard(AutoHTTPProtocol):
        # attributes of both of uvicorn's HTTP protocols, which AutoHTTPProtocol's declared type (asyncio.Protocol)
        # does not show
        transport: asyncio.Transport
        cycle: Any
        loop: asyncio.AbstractEventLoop
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_watch()

        def data_received(self, data: bytes) -> None:
            idle = self._idle()
            super().data_received(data)
            if idle and self._idle():         # still reading a request head
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes and not self.transport.is_closing():
                    self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                                         b"connection: close\r\n\r\n")
                    self.transport.close()
            self._head_watch()

        def on_response_complete(self) -> None:
            cast(Any, super()).on_response_complete()   # uvicorn's protocols define it; asyncio.Protocol does not
            self._head_watch()

        def connection_lost(self, exc) -> None:
            self._head_disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_watch(self) -> None:
            """Arm the deadline while waiting for a request head (never re-armed by the bytes of that head);
            disarm it once a request is under way (its body has the Gate's deadline)."""
            if self.transport is None or self.transport.is_closing():
                self._head_disarm()
            elif not self._idle():
                self._head_disarm()
                self._head_bytes = 0
            elif self._head_timer is None:
                self._head_bytes = 0
                self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout)

        def _head_disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

    return HeaderGuard


def check_tls(cert: str | None, key: str | None) -> None:
    """The certificate and key load (one line naming the problem, not uvicorn's traceback at start-up)."""
    if not cert:
        return
    if not key:
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    for what, f in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(f).is_file():
            raise ConfigError(f"{what}: file not found", f)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(f"the TLS certificate and key do not load together ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]})", cert) from None


def serve(runs, settings: ServeSettings) -> None:
    """Run the server in this process until interrupted (uvicorn, JSON logs, no access log). Stale upload
    folders of dead medlens processes are removed first, this process's own at exit."""
    configure()
    check_binding(settings)
    check_tls(settings.tls_cert, settings.tls_key)
    removed = remove_stale_spools()
    if removed:
        log("stale-uploads-removed", files=removed)
    if not is_local(settings.host) and not settings.tls:
        log("no-tls", 30, host=settings.host)   # keys and images travel in the clear: say so in the log
    app = create_app(runs, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=5, http=header_guard(settings.read_timeout_s),
                    ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    finally:
        remove_own_spool()
