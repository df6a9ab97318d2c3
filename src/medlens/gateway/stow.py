"""The gateway's STOW-RS receiver (DICOMweb, PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` on the
serve app (``medlens.serve.create_app`` with the gateway's runs), so behind its API keys, Host allow-list, upload
size limit and read timeout.

Each part of the ``multipart/related; type="application/dicom"`` body is read as a DICOM Part-10 file and kept
exactly like a C-STORE (``scp.Spool``: durable write, queue, audit, the sender recorded as ``STOW-RS``). The
answer is the PS3.18 store response in DICOM JSON: ReferencedSOPSequence for the instances kept,
FailedSOPSequence with the failure reason for the others; HTTP 200 when all were kept, 202 when some, 409 when
none, 415 for a body that is not multipart/related.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pydicom
import uvicorn
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from medlens.errors import ConfigError
from medlens.gateway.config import GatewayConfig
from medlens.gateway.scp import CANNOT_UNDERSTAND, SUCCESS, Spool
from medlens.serve import ServeSettings, create_app, load_api_keys
from medlens.serve.server import header_guard

SENDER = "STOW-RS"
DICOM_JSON = "application/dicom+json"
MISMATCH = 0xA900  # the instance's study is not the one in the URL


def related_parts(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a ``multipart/related`` body; ValueError when it is not one."""
    ctype, opts = parse_options_header(content_type)
    if ctype != b"multipart/related" or not opts.get(b"boundary"):
        raise ValueError("not multipart/related")
    parts: list[bytes] = []
    cur: list[bytes] = []

    def begin():
        cur.clear()

    def data(buf, start, end):
        cur.append(bytes(buf[start:end]))

    def end():
        parts.append(b"".join(cur))

    parser = MultipartParser(opts[b"boundary"], {"on_part_begin": begin, "on_part_data": data, "on_part_end": end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise ValueError("malformed multipart body") from None
    return parts


def _ref(ds, status: int | None = None) -> dict:
    item = {}
    if "SOPClassUID" in ds:
        item["00081150"] = {"vr": "UI", "Value": [str(ds.SOPClassUID)]}
    if "SOPInstanceUID" in ds:
        item["00081155"] = {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]}
    if status is not None:
        item["00081197"] = {"vr": "US", "Value": [status]}
    return item


def stow_router(spool: Spool) -> APIRouter:
    router = APIRouter(tags=["gateway"])

    async def store(request: Request, study: str | None = None) -> JSONResponse:
        body = await request.body()
        try:
            parts = related_parts(body, request.headers.get("content-type", ""))
        except ValueError as e:
            return JSONResponse({"detail": f"STOW-RS needs multipart/related; type=\"application/dicom\" ({e})"},
                                status_code=415)
        kept, failed = [], []
        for part in parts:
            try:
                ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
            except Exception:  # not a DICOM file: that part fails, the others go on
                failed.append({"00081197": {"vr": "US", "Value": [CANNOT_UNDERSTAND]}})
                continue
            if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
                failed.append(_ref(ds, MISMATCH))
                continue
            status = await run_in_threadpool(spool.store, ds, part, SENDER)
            (kept if status == SUCCESS else failed).append(_ref(ds, None if status == SUCCESS else status))
        answer: dict = {}
        if kept:
            answer["00081199"] = {"vr": "SQ", "Value": kept}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else (202 if kept else 409)
        return JSONResponse(answer, status_code=code, media_type=DICOM_JSON)

    router.add_api_route("/studies", store, methods=["POST"], summary="STOW-RS: store instances (gateway)")
    router.add_api_route("/studies/{study}", store, methods=["POST"],
                         summary="STOW-RS: store instances of one study (gateway)")
    return router


class StowServer:
    """The serve app with the STOW-RS routes, run by uvicorn in a thread of the gateway process."""

    def __init__(self, cfg: GatewayConfig, spool: Spool, runs: list[str | Path], source=None) -> None:
        s = cfg.stow
        assert s is not None
        keys = load_api_keys(s.api_key_file)
        self.settings = ServeSettings(host=s.host, port=s.port, api_keys=keys,
                                      max_upload_bytes=int(s.max_upload_mb * 1024 * 1024))
        self.app = create_app(runs, self.settings)
        self.app.include_router(stow_router(spool))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=s.host, port=s.port, log_config=None,
                                                    access_log=False, timeout_graceful_shutdown=5,
                                                    http=header_guard(self.settings.read_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, name="stow-rs", daemon=True)
        self.source = source

    def start(self, timeout: float = 120.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"cannot serve STOW-RS on {self.settings.host}:{self.settings.port} (the port is "
                                  "taken, or the server did not start)", self.source)
            time.sleep(0.05)
        return f"http://{self.settings.host}:{self.settings.port}/studies"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)
