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
``--read-timeout`` (408). The request headers get the same time limit and a size bound in ``server.serve()``
(``HeaderGuard``).

This module only assembles the app. The parts: ``settings`` (``ServeSettings``, the binding checks), ``auth``
(API keys, viewer sessions), ``errors`` (the JSON refusals, path redaction, exception handlers), ``gate`` (the
middleware), ``models`` (the served-model registry: backends, worker threads, micro-batching), ``routes/``
(one ``APIRouter`` per concern) and ``server`` (uvicorn, the header guard, TLS).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from medlens import __version__
from medlens.serve.auth import Auth, load_api_keys
from medlens.serve.context import ServeContext
from medlens.serve.errors import ErrorResponder, install_error_handlers, server_roots
from medlens.serve.gate import Gate
from medlens.serve.logs import log
from medlens.serve.metrics import Metrics
from medlens.serve.models import load_models
from medlens.serve.routes import ROUTERS
from medlens.serve.routes.viewer import STATIC
from medlens.serve.settings import ServeSettings, check_binding

__all__ = ["ServeSettings", "check_binding", "create_app", "load_api_keys"]


def create_app(runs: list[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``runs`` (run folders). Models are loaded now; warm-up runs at start-up."""
    settings = settings or ServeSettings()
    check_binding(settings)
    metrics = Metrics()
    models = load_models(runs, settings, metrics)
    ctx = ServeContext(settings=settings, models=models, metrics=metrics, auth=Auth(settings.api_keys),
                       error_response=ErrorResponder(server_roots(runs)))

    @asynccontextmanager
    async def lifespan(app):
        for m in models.values():
            await m.start()
        ctx.ready = True
        log("ready", models=list(models), host=settings.host, port=settings.port, auth=settings.auth,
            backend={k: m.backend for k, m in models.items()})
        yield
        ctx.ready = False
        for m in models.values():
            await m.stop()

    app = FastAPI(title="medlens", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Predictions, heatmaps and masks from trained medlens runs. Send images as "
                              "multipart/form-data `file` parts (several parts = one DICOM series). "
                              + ("An API key is required (`X-API-Key` or `Authorization: Bearer`)."
                                 if settings.auth else "Bound to localhost without API keys."))
    app.state.models = models
    app.state.settings = settings
    app.state.medlens = ctx
    install_error_handlers(app, ctx.error_response)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, ctx=ctx)
    return app
