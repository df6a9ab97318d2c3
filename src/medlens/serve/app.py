"""The FastAPI application of ``medlens serve``: REST API, viewer, health, metrics.

Routes:
- ``GET /v1/models``: every served run (name, task, classes, input spec, validation operating point, backend).
- ``POST /v1/models/{name}/predict``: multipart ``file`` (PNG/JPEG/TIFF, a DICOM file, several DICOM files of
  one series, NIfTI) -> probabilities, the decision at the validation threshold and a Grad-CAM heatmap.
- ``POST /v1/models/{name}/segment``: the same inputs -> mask, volume (or area) and largest diameter in mm.
- ``?format=dicom-sr|fhir`` on predict, for DICOM input: the TID 1500 SR (``application/dicom``) or the FHIR R5
  Bundle made from it (``medlens.report``); segmentation objects (SEG + SR) answer 501 for now.
- ``GET /healthz`` (process up), ``GET /readyz`` (models loaded and warmed up), ``GET /metrics`` (Prometheus).
- ``GET /`` the viewer; ``/static/*`` its files; ``/openapi.json`` the API description (no ``/docs``: Swagger UI
  would load its script from a CDN, and no PyPI package ships a Swagger UI that renders FastAPI's OpenAPI 3.1).

Every refusal is JSON ``{"error": {"status", "type", "message"}}`` with the right status (400, 401, 404, 408,
413, 415, 422, 501, 503 + Retry-After, 504), never a traceback and never a server path. Authentication: API keys
(``X-API-Key`` header, ``Authorization: Bearer``, or the viewer's session cookie set by ``POST /login``: a random
token mapped to the key on the server, never the key itself), required whenever the server is bound to anything
but localhost.

Exits guarded by ``Gate`` (the outermost middleware): a ``Host`` header outside the allow-list is 400 (DNS
rebinding); the request body is counted while it streams and refused with 413 as soon as it passes
``--max-upload-mb`` (chunked or not, nothing past the limit is read); the body must arrive within
``--read-timeout`` (408). The request headers get the same time limit and a size bound in ``serve()``
(``HeaderGuard``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.errors import ConfigError, DataError, MedlensError, ShapeError
from medlens.serve.inputs import UnsupportedMedia, Upload, read_uploads, small_png
from medlens.serve.logs import log
from medlens.serve.models import QueueFull, ServedModel

API_KEYS_ENV = "MEDLENS_API_KEYS"
SESSION_COOKIE = "medlens_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000
STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_upload_bytes: int = 256 * 1024 * 1024
    timeout_s: float = 120.0
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 64
    threads: int | None = None
    backend: str = "auto"
    names: dict[str, str] = field(default_factory=dict)
    read_timeout_s: float = 60.0                # request headers, and the whole body, must arrive within this
    allowed_hosts: tuple[str, ...] = ()         # Host header values accepted besides localhost and the bind address
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_incomplete: bool = False

    @property
    def auth(self) -> bool:
        return bool(self.api_keys)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def host_allowed(self) -> set[str]:
        """Host names (lower case, no port) that the Host header may carry; ``*`` accepts any."""
        hosts = {*DEFAULT_ALLOWED_HOSTS, *(h.strip().lower().strip("[]").rstrip(".") for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):
            hosts.add(self.host.lower().strip("[]"))
        if not is_local(self.host):      # this machine's own name (a rebinding attacker's names are never it)
            import socket

            hosts.add(socket.gethostname().lower())
        return hosts


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def load_api_keys(key_file: str | Path | None = None) -> tuple[str, ...]:
    """Keys from ``$MEDLENS_API_KEYS`` (comma-separated) and/or a file (one key per line, ``#`` comments)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise ConfigError("API key file not found", p)
        keys += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ConfigError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys "
                          "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return tuple(dict.fromkeys(keys))


def check_binding(settings: ServeSettings) -> None:
    if not is_local(settings.host) and not settings.auth:
        raise ConfigError(f"serving on {settings.host} (not localhost) requires API keys: set {API_KEYS_ENV} or "
                          "give --api-key-file")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if not settings.read_timeout_s > 0:
        raise ConfigError(f"--read-timeout must be a positive number of seconds, not {settings.read_timeout_s}")
    if not settings.max_upload_bytes > 0:
        raise ConfigError("--max-upload-mb must be positive")


_HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]{1,5})?$")


def host_of(header: str) -> str:
    """The host name of a Host header value, lower case, without port, brackets or a trailing dot; '' when
    the value is not a plain host[:port] (userinfo, paths, spaces and the like are never matched)."""
    m = _HOST_HEADER.match(header.strip().lower())
    if not m:
        return ""
    return m.group("v6") or m.group("name").rstrip(".")


_ABS_PATH = re.compile(r"(?<![\w.~-])(/[A-Za-z0-9._~+@%-]+)((?:/[^\s'\"`,;:()<>\[\]{}]*)*)")


def redact_paths(message: str, roots: tuple[str, ...] = ()) -> str:
    """``message`` without any server path: the given roots (run folders, the temporary folder) and any
    absolute path whose first folder exists on this machine become their last name (``…/name``)."""
    for r in sorted({str(x).rstrip("/") for x in roots if x and len(str(x)) > 1}, key=len, reverse=True):
        message = re.sub(re.escape(r) + r"(/[^\s'\"`,;:()<>\[\]{}]*)?",
                         lambda mt, r=r: "…/" + (mt.group(1) or "/" + Path(r).name).rstrip("/").rsplit("/", 1)[-1],
                         message)

    def one(mt: re.Match) -> str:
        if not os.path.isdir(mt.group(1)):   # '/v1/models': an API route, not a folder of this machine
            return mt.group(0)
        return "…/" + (mt.group(0).rstrip("/").rsplit("/", 1)[-1] or "")

    return _ABS_PATH.sub(one, message)


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _status_of(e: Exception) -> tuple[int, str]:
    if isinstance(e, UnsupportedMedia):
        return 415, "UnsupportedMediaType"
    if isinstance(e, (ShapeError, DataError, ConfigError)):
        return 422, type(e).__name__
    if isinstance(e, MedlensError):
        return 422, type(e).__name__
    return 500, "InternalError"


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("medlens_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("medlens_request_seconds", "request latency by route template", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.batch_size = Histogram("medlens_batch_size", "inputs per model call (micro-batching)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.rejected = Counter("medlens_rejected", "requests refused because the model queue was full",
                                ["model"], registry=self.registry)
        self.pending = Gauge("medlens_pending_requests", "requests in progress per model", ["model"],
                             registry=self.registry)


def _route_template(request) -> str:
    return _route_template_of(request.scope)


def _route_template_of(scope) -> str:
    return getattr(scope.get("route"), "path", None) or "unmatched"


def create_app(runs: list[str | Path], settings: ServeSettings | None = None):
    """The ASGI app serving ``runs`` (run folders). Models are loaded now; warm-up runs at start-up."""
    from contextlib import asynccontextmanager

    from medlens import __version__

    settings = settings or ServeSettings()
    check_binding(settings)
    metrics = Metrics()
    models: dict[str, ServedModel] = {}
    for r in runs:
        m = ServedModel(r, settings.names.get(str(r)), settings.backend, settings.max_batch, settings.max_wait_ms,
                        settings.max_queue, settings.threads, metrics, allow_incomplete=settings.allow_incomplete)
        if m.name in models:
            raise ConfigError(f"two runs are named '{m.name}'; give distinct run folders")
        models[m.name] = m
    if not models:
        raise ConfigError("no run to serve")
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        for m in models.values():
            await m.start()
        state["ready"] = True
        log("ready", models=list(models), host=settings.host, port=settings.port, auth=settings.auth,
            backend={k: m.backend for k, m in models.items()})
        yield
        state["ready"] = False
        for m in models.values():
            await m.stop()

    app = FastAPI(title="medlens", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Predictions, heatmaps and masks from trained medlens runs. Send images as "
                              "multipart/form-data `file` parts (several parts = one DICOM series). "
                              + ("An API key is required (`X-API-Key` or `Authorization: Bearer`)."
                                 if settings.auth else "Bound to localhost without API keys."))
    app.state.models = models
    app.state.settings = settings

    # ------------------------------------------------------------ errors: JSON, never a traceback or a path
    import tempfile

    server_roots = (*(str(Path(r)) for r in runs), *(str(Path(r).resolve()) for r in runs),
                    tempfile.gettempdir(), os.getcwd(), str(Path.home()))

    def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "type": kind, "message": redact_paths(message, server_roots)}},
                            status_code=status, headers=headers)

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError):
        return error_response(e.status, e.kind, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(422, "ValidationError", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "HTTPError", str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log("error", 40, route=_route_template(request), error=type(e).__name__, status=500)
        return error_response(500, "InternalError", "internal error (the server log has the error type)")

    # ------------------------------------------------------------ sessions of the viewer (cookie -> key identity)
    def _key_id(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def _valid(key: str | None) -> bool:
        return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys)

    sessions: dict[str, tuple[str, float]] = {}   # random token -> (sha256 of the key, expiry on time.monotonic)

    def _new_session(key: str) -> str:
        now = time.monotonic()
        for t in [t for t, (_, exp) in sessions.items() if exp <= now]:
            del sessions[t]
        while len(sessions) >= MAX_SESSIONS:      # oldest first (dicts keep insertion order)
            del sessions[next(iter(sessions))]
        token = secrets.token_urlsafe(32)
        sessions[token] = (_key_id(key), now + SESSION_TTL_S)
        return token

    def _session_valid(token: str | None) -> bool:
        entry = sessions.get(token or "")
        if entry is None:
            return False
        kid, exp = entry
        if exp <= time.monotonic() or not any(hmac.compare_digest(kid, _key_id(k)) for k in settings.api_keys):
            sessions.pop(token, None)
            return False
        return True

    # ------------------------------------------------------------ middleware: host, size, time, auth, logs
    public = ("/healthz", "/readyz", "/static/", "/openapi.json", "/login", "/logout", "/favicon.ico")
    allowed_hosts = settings.host_allowed()
    limit = settings.max_upload_bytes

    class _Refused(Exception):
        """Raised into the application when its request body is refused (too large or too slow)."""

    class Gate:
        """Pure ASGI middleware (no extra task per request): the Host allow-list (400), the request size limit
        counted while the body streams (413), the body read timeout (408), API keys (401), the request id
        header, one JSON log line and the metrics of every request."""

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            from starlette.datastructures import Headers
            from starlette.requests import cookie_parser

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
                except asyncio.TimeoutError:
                    refused[0] = (408, "RequestTimeout", f"the request body did not arrive within "
                                  f"{settings.read_timeout_s:g} s (--read-timeout)")
                    raise _Refused() from None
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        refused[0] = (413, "PayloadTooLarge", f"request body over the limit of {limit} bytes "
                                      "(--max-upload-mb)")
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
                if "*" not in allowed_hosts and (len(hosts) != 1 or host_of(hosts[0]) not in allowed_hosts):
                    await refuse(400, "BadHost", "the Host header names a host this server does not answer to "
                                 "(start serve with --allowed-host NAME to accept one)")
                    return
                if length is not None and length.isdigit() and int(length) > limit:
                    await refuse(413, "PayloadTooLarge", f"request body of {int(length)} bytes is over the limit "
                                 f"of {limit} bytes (--max-upload-mb)")
                    return
                authed = True
                if settings.auth:
                    key = headers.get("x-api-key")
                    auth = headers.get("authorization", "")
                    if not key and auth.lower().startswith("bearer "):
                        key = auth[7:].strip()
                    authed = _valid(key) or (
                        not key and _session_valid(cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)))
                    if not authed and not path.startswith(public):
                        if path == "/" and "text/html" in headers.get("accept", ""):
                            resp = HTMLResponse(_page("401.html"), status_code=401)
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
                    log("refused", 30, route=_route_template_of(scope), status=status[0], bytes=seen[0])
            finally:
                route = _route_template_of(scope)
                ms = round((time.perf_counter() - t0) * 1000, 2)
                if not path.startswith("/static/"):
                    name = (scope.get("path_params") or {}).get("name")
                    metrics.requests.labels(route, str(status[0])).inc()
                    metrics.latency.labels(route).observe(ms / 1000)
                    log("request", request_id=rid, method=scope.get("method"), route=route, status=status[0],
                        ms=ms, model=name if name in models else None)

    async def _read_body_limited(files: list) -> list[Upload]:
        """Upload parts as bytes (their sum is bounded by the Gate's streaming limit; checked again here)."""
        out, total = [], 0
        for f in files:
            data = await f.read()
            total += len(data)
            if total > settings.max_upload_bytes:
                raise HttpError(413, "PayloadTooLarge", f"upload over the limit of {settings.max_upload_bytes} bytes")
            out.append(Upload(data, f.filename or ""))
        return out

    def _model(name: str) -> ServedModel:
        m = models.get(name)
        if m is None:
            raise HttpError(404, "NotFound", f"no model named '{name}'; GET /v1/models lists them")
        return m

    async def _guarded(m: ServedModel, work, route: str):
        """Admission (bounded queue -> 503), per-request timeout (504), errors -> JSON statuses."""
        try:
            m.admit()
        except QueueFull:
            raise HttpError(503, "Busy", f"model '{m.name}' has {m.max_queue} requests in progress; retry shortly",
                            {"Retry-After": "1"}) from None
        metrics.pending.labels(m.name).set(m.pending)
        try:
            return await asyncio.wait_for(work(), settings.timeout_s)
        except QueueFull:
            raise HttpError(503, "Busy", f"model '{m.name}' queue is full; retry shortly",
                            {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise HttpError(504, "Timeout", f"the request took longer than {settings.timeout_s:g} s "
                            "(--timeout)") from None
        except HttpError:
            raise
        except Exception as e:
            status, kind = _status_of(e)
            log("refused", 30 if status < 500 else 40, route=route, model=m.name, status=status,
                error=type(e).__name__)
            raise HttpError(status, kind, str(e) if status < 500 else "internal error while running the model") \
                from None
        finally:
            m.release()
            metrics.pending.labels(m.name).set(m.pending)

    def _check_format(fmt: str | None, m: ServedModel) -> bool:
        """True when a standard object (SR / FHIR) is asked for; refusals before any work."""
        if fmt in (None, "", "json"):
            return False
        if fmt not in ("fhir", "dicom-sr"):
            raise HttpError(422, "ValidationError", f"format must be json, fhir or dicom-sr, not '{fmt}'")
        if m.is_segmentation:
            raise HttpError(501, "NotImplemented", f"format={fmt} for segmentation (DICOM SEG + SR + FHIR) is not "
                            "served yet; use `medlens segment RUN SERIES --out DIR --outputs sr,seg,fhir`")
        return True

    def _standard_response(fmt: str, sr) -> Response:
        from medlens.serve.outputs import sr_bytes, sr_fhir_json

        if fmt == "dicom-sr":
            return Response(sr_bytes(sr), media_type="application/dicom",
                            headers={"Content-Disposition": 'attachment; filename="result_sr.dcm"'})
        return Response(sr_fhir_json(sr), media_type="application/fhir+json")

    files_param = File(..., description="the image: one PNG/JPEG/TIFF, DICOM or NIfTI file, or every DICOM "
                                        "file of one series as several `file` parts")

    # ------------------------------------------------------------ API
    @app.get("/v1/models", summary="Served models and their operating points")
    async def list_models():
        return {"models": [m.info() for m in models.values()]}

    @app.get("/v1/models/{name}", summary="One served model")
    async def get_model(name: str):
        return _model(name).info()

    @app.post("/v1/models/{name}/predict", summary="Classify an image: probabilities, decision, heatmap")
    async def predict(name: str, file: list[UploadFile] = files_param,
                      heatmap: bool = Query(True, description="compute a Grad-CAM heatmap (PyTorch)"),
                      display: bool = Query(False, description="also return the image and the heatmap as "
                                                               "NIfTI in the image's geometry (the viewer's)"),
                      format: Optional[str] = Query(None, description="json (default), fhir or dicom-sr")):
        m = _model(name)
        if m.is_segmentation:
            raise HttpError(422, "WrongEndpoint", f"'{name}' is a segmentation model; POST .../segment")
        standard = _check_format(format, m)
        uploads = await _read_body_limited(file)

        async def work():
            t0 = time.perf_counter()
            sources = [] if standard else None
            if small_png(uploads) and not standard:   # a thread hop costs more than decoding a small PNG
                image, kind, x = _prepare(m, uploads)
            else:
                image, kind, x = await asyncio.to_thread(_prepare, m, uploads, sources)
            t_prep = time.perf_counter()
            p = await m.probabilities(x)
            if standard:
                return await asyncio.to_thread(m.result_sr, sources, p)
            out = {"model": m.name, "backend": m.backend, "task": str(m.meta.task),
                   "input": {"kind": kind, "shape": list(image.shape), "spacing_mm": [float(s) for s in image.spacing],
                             "files": len(uploads)},
                   **m.answer(p)}
            t_inf = time.perf_counter()
            if heatmap and m.backend != "classical":
                hm, info = await m.run_in_worker(m.heatmap, x)
                out["heatmap"] = await asyncio.to_thread(_heatmap_payload, m, image, hm, info, display)
            if display:
                out["display"] = {"image": await asyncio.to_thread(_display_b64, image), "encoding": "nifti-gz-base64"}
            out["timing_ms"] = {"prepare": round((t_prep - t0) * 1000, 2), "model": round((t_inf - t_prep) * 1000, 2),
                                "total": round((time.perf_counter() - t0) * 1000, 2)}
            return out

        payload = await _guarded(m, work, "predict")
        return _standard_response(format, payload) if standard else JSONResponse(payload)

    @app.post("/v1/models/{name}/segment", summary="Segment an image: mask, volume and diameter")
    async def segment(name: str, file: list[UploadFile] = files_param,
                      display: bool = Query(False, description="also return the image as NIfTI (the viewer's)"),
                      format: Optional[str] = Query(None, description="json (default), fhir or dicom-sr")):
        m = _model(name)
        if not m.is_segmentation:
            raise HttpError(422, "WrongEndpoint", f"'{name}' is a classifier; POST .../predict")
        _check_format(format, m)
        uploads = await _read_body_limited(file)

        async def work():
            t0 = time.perf_counter()
            image, kind, x = await asyncio.to_thread(_prepare, m, uploads)
            probs, labels = await m.run_in_worker(m.segment, x)
            out = {"model": m.name, "backend": m.backend, "task": "segmentation", "classes": list(m.meta.class_names),
                   "threshold": m.meta.threshold.value if m.meta.threshold else None,
                   "input": {"kind": kind, "shape": list(image.shape),
                             "spacing_mm": [float(s) for s in image.spacing], "files": len(uploads)}}
            out.update(await asyncio.to_thread(_mask_payload, m, image, labels, display))
            out["timing_ms"] = {"total": round((time.perf_counter() - t0) * 1000, 2)}
            return out

        return JSONResponse(await _guarded(m, work, "segment"))

    # ------------------------------------------------------------ health and metrics
    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Models loaded and warmed up (model names and backends only with a key)")
    async def readyz(request: Request):
        if not state["ready"]:
            return error_response(503, "NotReady", "models are loading")
        if not request.scope.get("medlens.authorized"):
            return {"status": "ready"}
        return {"status": "ready", "models": {k: m.backend for k, m in models.items()}}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ viewer
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def viewer():
        return HTMLResponse(_page("index.html"))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        key = str(form.get("key", ""))
        if not _valid(key):
            return HTMLResponse(_page("401.html"), status_code=401)
        resp = RedirectResponse("/", status_code=303)
        # a random session token (the key stays in the browser's form, never in a cookie or on disk)
        resp.set_cookie(SESSION_COOKIE, _new_session(key), max_age=SESSION_TTL_S, httponly=True,
                        samesite="strict", secure=settings.tls, path="/")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        from starlette.requests import cookie_parser

        sessions.pop(cookie_parser(request.headers.get("cookie", "")).get(SESSION_COOKIE, ""), None)
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=settings.tls, path="/")
        return resp

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate)
    return app


def _page(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------- the server process
MAX_HEADER_BYTES = 64 * 1024


def header_guard(read_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES):
    """uvicorn's HTTP protocol (httptools or h11, as uvicorn picks) with a deadline and a size bound on the
    request headers: a connection that has not sent a complete request head within ``read_timeout_s`` of
    opening (or of its previous answer, on keep-alive), or sends more than ``max_header_bytes`` of it, is
    closed. uvicorn has a keep-alive timeout but none for the header phase (a slow-header client is otherwise
    held for ever), and its httptools parser has no header size limit."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderGuard(AutoHTTPProtocol):   # type: ignore[misc, valid-type]
        _head_timer = None
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
            super().on_response_complete()
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
    import ssl

    if not cert:
        return
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
    import uvicorn

    from medlens.serve.inputs import remove_own_spool, remove_stale_spools
    from medlens.serve.logs import configure

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


# ---------------------------------------------------------------- work done off the event loop
def _prepare(m: ServedModel, uploads: list[Upload], sources: list | None = None):
    image, kind = read_uploads(uploads, m.meta.in_channels, sources)
    image = m.predictor.load(image)
    if m.meta.spatial_dims == 2 and m.meta.preprocessing.pixel_spacing and image.spatial_dims == 2:
        image = image.with_array(image.array, spacing=np.array([m.meta.preprocessing.pixel_spacing] * 2))
    x = m.predictor.prepare(image, "upload")
    return image, kind, x


def _display_b64(image) -> str:
    from medlens.serve.outputs import display_volume, nifti_b64

    return nifti_b64(display_volume(image))


def _heatmap_payload(m: ServedModel, image, hm: np.ndarray, info: dict, display: bool) -> dict:
    from medlens.serve.outputs import nifti_b64, png_b64, to_image_grid

    names = m.meta.class_names
    t = int(info["targets"][0])
    grid = to_image_grid(hm, image.shape[:image.spatial_dims] if not image.is_rgb else image.shape[:2])
    out = {"method": "gradcam", "target": names[t] if t < len(names) else str(t), "layer": info.get("layer"),
           "model_grid_shape": list(hm.shape), "shape": list(grid.shape),
           "values": "uint8, 0-255 for Grad-CAM 0-1 (normalised to the map's maximum)"}
    g8 = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    if grid.ndim == 2:
        out["png"] = png_b64(g8)
    if display or grid.ndim == 3:
        out["nifti"] = nifti_b64(image.with_array(g8, is_rgb=False))
        out["encoding"] = "png-base64 (2D) / nifti-gz-base64, in the image's grid and geometry"
    return out


def _mask_payload(m: ServedModel, image, labels: np.ndarray, display: bool) -> dict:
    from medlens.serve.outputs import display_volume, mask_measures, nifti_b64, png_b64

    shape = image.shape[:2] if image.is_rgb else image.shape
    if tuple(labels.shape) != tuple(shape):
        from medlens.serve.outputs import to_image_grid

        labels = (to_image_grid(labels.astype(np.float32), shape) >= 0.5).astype(np.uint8)
    spacing = np.asarray(image.spacing, float)
    out = {"measures": mask_measures(labels, spacing)}
    mask = {"shape": list(labels.shape), "labels": {str(i): n for i, n in enumerate(m.meta.class_names)}}
    mask["nifti"] = nifti_b64(image.with_array(labels.astype(np.uint8), is_rgb=False))
    if labels.ndim == 2:
        mask["png"] = png_b64(labels.astype(np.uint8))
    out["mask"] = mask
    if display:
        out["display"] = {"image": nifti_b64(display_volume(image)), "encoding": "nifti-gz-base64"}
    return out

