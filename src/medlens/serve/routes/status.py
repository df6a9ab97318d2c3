"""What is served and in what state: ``GET /v1/models``, ``GET /v1/models/{name}``, ``GET /healthz`` (process
up), ``GET /readyz`` (models loaded and warmed up; model names and backends only to an authorized caller) and
``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from medlens.serve.context import Ctx, ServeContext
from medlens.serve.errors import HttpError
from medlens.serve.models import ServedModel

models_router = APIRouter()
router = APIRouter()


def served(ctx: ServeContext, name: str) -> ServedModel:
    """The served model called ``name``; 404 otherwise."""
    m = ctx.models.get(name)
    if m is None:
        raise HttpError(404, "NotFound", f"no model named '{name}'; GET /v1/models lists them")
    return m


@models_router.get("/v1/models", summary="Served models and their operating points")
async def list_models(ctx: Ctx):
    return {"models": [m.info() for m in ctx.models.values()]}


@models_router.get("/v1/models/{name}", summary="One served model")
async def get_model(name: str, ctx: Ctx):
    return served(ctx, name).info()


@router.get("/healthz", summary="The process is up")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Models loaded and warmed up (model names and backends only with a key)")
async def readyz(request: Request, ctx: Ctx):
    if not ctx.ready:
        return ctx.error_response(503, "NotReady", "models are loading")
    if not request.scope.get("medlens.authorized"):
        return {"status": "ready"}
    return {"status": "ready", "models": {k: m.backend for k, m in ctx.models.items()}}


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(ctx: Ctx):
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
