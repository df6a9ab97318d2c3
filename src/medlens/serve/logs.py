"""Structured JSON logs for the server: one object per line, fixed fields, no patient data.

What is logged: time, level, event, request id, method, the route *template* (``/v1/models/{name}/predict``,
never the raw path or query string), model name, status, duration, input kind and size in bytes, and the
error type and HTTP status of refusals. Never logged: file names, DICOM attributes, image content, error
messages that quote input (they may carry names), API keys or headers.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "medlens.serve"
_FIELDS = ("event", "request_id", "method", "route", "model", "status", "ms", "kind", "bytes", "files", "error",
           "backend", "host", "port", "models", "auth", "batch")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name}
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update({k: extra[k] for k in _FIELDS if k in extra})
        else:  # a library's own message (uvicorn start-up lines): its text, which carries no request data
            out["event"] = "library"
            out["message"] = record.getMessage()[:300]
        return json.dumps(out, separators=(",", ":"))


def configure(level: int = logging.INFO) -> logging.Logger:
    """JSON lines on stderr for medlens.serve and uvicorn's error logger; uvicorn's access log is off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level)
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
    return logging.getLogger(LOGGER)


def log(event: str, level: int = logging.INFO, **fields) -> None:
    logging.getLogger(LOGGER).log(level, event, extra={"fields": {"event": event, **fields}})


def route_template(scope) -> str:
    """The matched route's template (``/v1/models/{name}/predict``) of an ASGI scope: what logs and metrics
    name a request by (never its raw path); ``unmatched`` before routing or when nothing matched."""
    return getattr(scope.get("route"), "path", None) or "unmatched"
