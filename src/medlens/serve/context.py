"""``ServeContext``: what the routes and the middleware of one app share (settings, served models, metrics,
keys and sessions, the error answer, readiness), held on ``app.state.medlens``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from medlens.serve.auth import Auth
from medlens.serve.errors import ErrorResponder
from medlens.serve.metrics import Metrics
from medlens.serve.models import ServedModel
from medlens.serve.settings import ServeSettings


@dataclass
class ServeContext:
    settings: ServeSettings
    models: dict[str, ServedModel]
    metrics: Metrics
    auth: Auth
    error_response: ErrorResponder
    ready: bool = False


def context(request: Request) -> ServeContext:
    """The app's context (a FastAPI dependency of the routes)."""
    return request.app.state.medlens


#: a route's parameter ``ctx: Ctx`` receives the app's ``ServeContext``
Ctx = Annotated[ServeContext, Depends(context)]
