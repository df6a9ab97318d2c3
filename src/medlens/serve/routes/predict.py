"""Model work: ``POST /v1/models/{name}/predict`` (probabilities, the decision at the validation threshold, a
Grad-CAM heatmap; ``?format=dicom-sr|fhir`` for DICOM input) and ``POST /v1/models/{name}/segment`` (mask,
volume or area, largest diameter).

Each request is admitted against the model's bounded queue (503 + Retry-After when full), runs under the
per-request timeout (504), and its errors become JSON statuses (``errors.status_of``). Decoding and
preparation run off the event loop (except small PNGs), model work on the model's worker thread.
"""

from __future__ import annotations

import asyncio
import time
import numpy as np
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from medlens.serve.context import Ctx, ServeContext
from medlens.serve.errors import HttpError, status_of
from medlens.serve.inputs import Upload, read_uploads, small_png
from medlens.serve.logs import log
from medlens.serve.models import QueueFull, ServedModel
from medlens.serve.outputs import (display_volume, mask_measures, nifti_b64, png_b64, sr_bytes, sr_fhir_json,
                                   to_image_grid)
from medlens.serve.routes.status import served

router = APIRouter()

files_param = File(..., description="the image: one PNG/JPEG/TIFF, DICOM or NIfTI file, or every DICOM "
                                    "file of one series as several `file` parts")


@router.post("/v1/models/{name}/predict", summary="Classify an image: probabilities, decision, heatmap")
async def predict(name: str, ctx: Ctx, file: list[UploadFile] = files_param,
                  heatmap: bool = Query(True, description="compute a Grad-CAM heatmap (PyTorch)"),
                  display: bool = Query(False, description="also return the image and the heatmap as "
                                                           "NIfTI in the image's geometry (the viewer's)"),
                  format: str | None = Query(None, description="json (default), fhir or dicom-sr")):
    m = served(ctx, name)
    if m.is_segmentation:
        raise HttpError(422, "WrongEndpoint", f"'{name}' is a segmentation model; POST .../segment")
    standard = _check_format(format, m)
    uploads = await _read_body_limited(ctx, file)

    async def work():
        t0 = time.perf_counter()
        sources: list = []   # the DICOM instances of the input, for a standard answer
        if small_png(uploads) and not standard:   # a thread hop costs more than decoding a small PNG
            image, kind, x, reasons = _prepare(m, uploads)
        else:
            image, kind, x, reasons = await asyncio.to_thread(_prepare, m, uploads, sources if standard else None)
        _gate(ctx, m, reasons)
        t_prep = time.perf_counter()
        p = await m.probabilities(x)
        if standard:
            return await asyncio.to_thread(m.result_sr, sources, p, reasons)
        out = {"model": m.name, "backend": m.backend, "task": str(m.meta.task),
               "input": {"kind": kind, "shape": list(image.shape), "spacing_mm": [float(s) for s in image.spacing],
                         "files": len(uploads)},
               **m.answer(p), **_outside(reasons)}
        t_inf = time.perf_counter()
        if heatmap and m.backend != "classical":
            hm, info = await m.run_in_worker(m.heatmap, x)
            out["heatmap"] = await asyncio.to_thread(_heatmap_payload, m, image, hm, info, display)
        if display:
            out["display"] = {"image": await asyncio.to_thread(_display_b64, image), "encoding": "nifti-gz-base64"}
        out["timing_ms"] = {"prepare": round((t_prep - t0) * 1000, 2), "model": round((t_inf - t_prep) * 1000, 2),
                            "total": round((time.perf_counter() - t0) * 1000, 2)}
        return out

    payload = await _guarded(ctx, m, work, "predict")
    return _standard_response(format, payload) if standard else JSONResponse(payload)


@router.post("/v1/models/{name}/segment", summary="Segment an image: mask, volume and diameter")
async def segment(name: str, ctx: Ctx, file: list[UploadFile] = files_param,
                  display: bool = Query(False, description="also return the image as NIfTI (the viewer's)"),
                  format: str | None = Query(None, description="json (default), fhir or dicom-sr")):
    m = served(ctx, name)
    if not m.is_segmentation:
        raise HttpError(422, "WrongEndpoint", f"'{name}' is a classifier; POST .../predict")
    _check_format(format, m)
    uploads = await _read_body_limited(ctx, file)

    async def work():
        t0 = time.perf_counter()
        image, kind, x, reasons = await asyncio.to_thread(_prepare, m, uploads)
        _gate(ctx, m, reasons)
        _, labels = await m.run_in_worker(m.segment, x)
        out = {"model": m.name, "backend": m.backend, "task": "segmentation", "classes": list(m.meta.class_names),
               "threshold": m.meta.threshold.value if m.meta.threshold else None,
               "input": {"kind": kind, "shape": list(image.shape),
                         "spacing_mm": [float(s) for s in image.spacing], "files": len(uploads)},
               **_outside(reasons)}
        out.update(await asyncio.to_thread(_mask_payload, m, image, labels, display))
        out["timing_ms"] = {"total": round((time.perf_counter() - t0) * 1000, 2)}
        return out

    return JSONResponse(await _guarded(ctx, m, work, "segment"))


# ---------------------------------------------------------------- admission, limits, formats
def _gate(ctx: ServeContext, m: ServedModel, reasons: list[str]) -> None:
    """Issue 26: an input outside the run's training profile is refused (422, the reasons in the JSON) unless
    the server was started with --allow-out-of-profile."""
    if reasons and not ctx.settings.allow_out_of_profile:
        log("refused", 30, model=m.name, status=422, error="OutOfProfile")
        raise HttpError(422, "OutOfProfile", f"upload: outside the training data of '{m.name}' "
                        f"({'; '.join(reasons)}); refused (the server answers such inputs only when started "
                        "with --allow-out-of-profile)", details={"outside_training_data": True, "reasons": reasons})


def _outside(reasons: list[str]) -> dict:
    """What an allowed out-of-profile answer carries: the flag and the reasons (nothing for an ordinary input)."""
    return {"outside_training_data": True, "input_warnings": list(reasons)} if reasons else {}


async def _read_body_limited(ctx: ServeContext, files: list) -> list[Upload]:
    """Upload parts as bytes (their sum is bounded by the Gate's streaming limit; checked again here)."""
    limit = ctx.settings.max_upload_bytes
    out, total = [], 0
    for f in files:
        data = await f.read()
        total += len(data)
        if total > limit:
            raise HttpError(413, "PayloadTooLarge", f"upload over the limit of {limit} bytes")
        out.append(Upload(data, f.filename or ""))
    return out


async def _guarded(ctx: ServeContext, m: ServedModel, work, route: str):
    """Admission (bounded queue -> 503), per-request timeout (504), errors -> JSON statuses."""
    metrics, timeout_s = ctx.metrics, ctx.settings.timeout_s
    try:
        m.admit()
    except QueueFull:
        raise HttpError(503, "Busy", f"model '{m.name}' has {m.max_queue} requests in progress; retry shortly",
                        {"Retry-After": "1"}) from None
    metrics.pending.labels(m.name).set(m.pending)
    try:
        return await asyncio.wait_for(work(), timeout_s)
    except QueueFull:
        raise HttpError(503, "Busy", f"model '{m.name}' queue is full; retry shortly",
                        {"Retry-After": "1"}) from None
    except TimeoutError:
        raise HttpError(504, "Timeout", f"the request took longer than {timeout_s:g} s "
                        "(--timeout)") from None
    except HttpError:
        raise
    except Exception as e:
        status, kind = status_of(e)
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


def _standard_response(fmt: str | None, sr) -> Response:
    if fmt == "dicom-sr":
        return Response(sr_bytes(sr), media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="result_sr.dcm"'})
    return Response(sr_fhir_json(sr), media_type="application/fhir+json")


# ---------------------------------------------------------------- work done off the event loop
def _prepare(m: ServedModel, uploads: list[Upload], sources: list | None = None):
    image, kind = read_uploads(uploads, m.meta.in_channels, sources)
    image = m.predictor.load(image)
    if m.meta.spatial_dims == 2 and m.meta.preprocessing.pixel_spacing and image.spatial_dims == 2:
        image = image.with_array(image.array, spacing=np.array([m.meta.preprocessing.pixel_spacing] * 2))
    x = m.predictor.prepare(image, "upload")
    return image, kind, x, m.predictor.input_warnings(image, x)


def _display_b64(image) -> str:
    return nifti_b64(display_volume(image))


def _heatmap_payload(m: ServedModel, image, hm: np.ndarray, info: dict, display: bool) -> dict:
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
    shape = image.shape[:2] if image.is_rgb else image.shape
    if tuple(labels.shape) != tuple(shape):
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
