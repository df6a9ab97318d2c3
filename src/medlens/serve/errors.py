"""How the server refuses: JSON ``{"error": {"status", "type", "message"}}`` with the right status, never a
traceback and never a server path (``redact_paths``).

``HttpError`` is raised by routes; ``status_of`` maps medlens's own errors to HTTP statuses (415 for an
unsupported upload, 422 for bad input, 500 for anything else, whose message is not sent);
``install_error_handlers`` makes FastAPI answer every exception that way.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens.errors import ConfigError, DataError, MedlensError, ShapeError
from medlens.serve.inputs import UnsupportedMedia
from medlens.serve.logs import log, route_template


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None,
                 details: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}
        self.details = details or {}   # extra JSON fields of the error (e.g. an out-of-profile input's reasons)


def status_of(e: Exception) -> tuple[int, str]:
    if isinstance(e, UnsupportedMedia):
        return 415, "UnsupportedMediaType"
    if isinstance(e, (ShapeError, DataError, ConfigError)):
        return 422, type(e).__name__
    if isinstance(e, MedlensError):
        return 422, type(e).__name__
    return 500, "InternalError"


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


def server_roots(runs) -> tuple[str, ...]:
    """The folders of this machine that messages are redacted of: the runs (as given and resolved), the
    temporary folder, the working folder and the home folder."""
    return (*(str(Path(r)) for r in runs), *(str(Path(r).resolve()) for r in runs),
            tempfile.gettempdir(), os.getcwd(), str(Path.home()))


class ErrorResponder:
    """Builds the JSON error answer, with the server's paths redacted from its message."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def __call__(self, status: int, kind: str, message: str, headers: dict | None = None,
                 details: dict | None = None) -> JSONResponse:
        error = {"status": status, "type": kind, "message": redact_paths(message, self.roots)}
        for k, v in (details or {}).items():
            error.setdefault(k, v)
        return JSONResponse({"error": error}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, error_response: ErrorResponder) -> None:
    """Every exception a route raises answers JSON: ``HttpError`` as given, request validation 422, Starlette's
    HTTP errors with their status, anything else 500 with its type in the server log only."""

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError):
        return error_response(e.status, e.kind, e.message, e.headers, e.details)

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
        log("error", 40, route=route_template(request.scope), error=type(e).__name__, status=500)
        return error_response(500, "InternalError", "internal error (the server log has the error type)")
