"""``Gate``, the outermost middleware: every exit rule a request meets before any route runs.

A ``Host`` header outside the allow-list is 400 (DNS rebinding); the request body is counted while it streams
and refused with 413 as soon as it passes ``--max-upload-mb`` (chunked or not, nothing past the limit is
read); the body must arrive within ``--read-timeout`` (408); API keys or a session (401, except the public
paths). Every request gets an ``x-request-id`` header, one JSON log line and its metrics. The request headers
get the same time limit and a size bound in ``server.header_guard``.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi.responses import HTMLResponse
from starlette.datastructures import Headers

from medlens.serve.context import ServeContext
from medlens.serve.logs import log, route_template
from medlens.serve.routes.viewer import page
from medlens.serve.settings import host_of

#: paths answered without an API key
PUBLIC = ("/healthz", "/readyz", "/static/", "/openapi.json", "/login", "/logout", "/favicon.ico")


class _Refused(Exception):
    """Raised into the application when its request body is refused (too large or too slow)."""


class Gate:
    """Pure ASGI middleware (no extra task per request): the Host allow-list (400), the request size limit
    counted while the body streams (413), the body read timeout (408), API keys (401), the request id
    header, one JSON log line and the metrics of every request."""

    def __init__(self, inner, ctx: ServeContext) -> None:
        self.inner = inner
        self.ctx = ctx
        self.allowed_hosts = ctx.settings.host_allowed()
        self.limit = ctx.settings.max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        ctx, settings, limit, error_response = self.ctx, self.ctx.settings, self.limit, self.ctx.error_response

        t0 = time.perf_counter()
        rid = secrets.token_hex(6)
        path = scope["path"]
        headers = Headers(scope=scope)
        status = [500]
        started = [False]
        refused: list = [None]          # (status, kind, message) once the body is refused
        seen = [0]
        body_done = [False]
        deadline = time.monotonic() + settings.read_timeout_s

        async def send_with_id(message):
            if refused[0] is not None and not started[0]:
                return                   # the application's answer to a refused body: ours is sent instead
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        async def limited_receive():
            """The body counted as it arrives: refused past the byte limit or the read deadline, before
            any more of it is read (nothing past the limit is spooled or parsed)."""
            if refused[0] is not None:
                raise _Refused()
            if body_done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                refused[0] = (408, "RequestTimeout", (f"the request body did not arrive within "
                                                      f"{settings.read_timeout_s:g} s (--read-timeout)"))
                raise _Refused() from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    refused[0] = (413, "PayloadTooLarge", (f"request body over the limit of {limit} bytes "
                                                           "(--max-upload-mb)"))
                    raise _Refused()
                body_done[0] = not message.get("more_body", False)
            else:
                body_done[0] = True
            return message

        async def refuse(status_code: int, kind: str, message: str, extra: dict | None = None) -> None:
            await error_response(status_code, kind, message, {"Connection": "close", **(extra or {})})(
                scope, receive, send_with_id)

        try:
            length = headers.get("content-length")
            resp = None
            hosts = headers.getlist("host")
            if "*" not in self.allowed_hosts and (len(hosts) != 1 or host_of(hosts[0]) not in self.allowed_hosts):
                await refuse(400, "BadHost", "the Host header names a host this server does not answer to "
                             "(start serve with --allowed-host NAME to accept one)")
                return
            if length is not None and length.isdigit() and int(length) > limit:
                await refuse(413, "PayloadTooLarge", f"request body of {int(length)} bytes is over the limit "
                             f"of {limit} bytes (--max-upload-mb)")
                return
            authed = True
            if settings.auth:
                authed = ctx.auth.authorized(headers)
                if not authed and not path.startswith(PUBLIC):
                    if path == "/" and "text/html" in headers.get("accept", ""):
                        resp = HTMLResponse(page("401.html"), status_code=401)
                    else:
                        resp = error_response(401, "Unauthorized", "an API key is required (X-API-Key header "
                                              "or Authorization: Bearer)", {"WWW-Authenticate": "Bearer"})
            scope["medlens.authorized"] = authed
            if resp is not None:
                await resp(scope, receive, send_with_id)
                return
            try:
                await self.inner(scope, limited_receive, send_with_id)
            except Exception:
                if refused[0] is None:
                    raise
            if refused[0] is not None:
                if not started[0]:
                    s_, kind, msg = refused[0]
                    refused[0], started[0] = None, False
                    await refuse(s_, kind, msg)
                log("refused", 30, route=route_template(scope), status=status[0], bytes=seen[0])
        finally:
            route = route_template(scope)
            ms = round((time.perf_counter() - t0) * 1000, 2)
            if not path.startswith("/static/"):
                name = (scope.get("path_params") or {}).get("name")
                ctx.metrics.requests.labels(route, str(status[0])).inc()
                ctx.metrics.latency.labels(route).observe(ms / 1000)
                log("request", request_id=rid, method=scope.get("method"), route=route, status=status[0],
                    ms=ms, model=name if name in ctx.models else None)
