"""What the server sends back besides numbers: images and maps as NIfTI (in the input's geometry, so a viewer
puts them where the image is) or PNG, and the size of a mask (volume or area, largest diameter) in mm."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path
from typing import cast

import cv2
import numpy as np
from PIL import Image as PILImage
from scipy import ndimage
from scipy.ndimage import zoom
from scipy.spatial import ConvexHull

from medlens.io import save
from medlens.io.image import Image
from medlens.report.dicom_sr import read_tid1500, write_sr
from medlens.report.fhir import sr_to_bundle
from medlens.serve.inputs import spool_prefix


def nifti_b64(image: Image) -> str:
    """Base64 of a gzipped NIfTI of ``image`` (its spacing, origin and direction kept)."""
    tmp = Path(tempfile.mkdtemp(prefix=spool_prefix("out")))
    try:
        path = tmp / "image.nii.gz"
        save(image, path)
        return base64.b64encode(path.read_bytes()).decode("ascii")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def display_volume(image: Image) -> Image:
    """The image for display, one channel, in its own values (HU for CT: the viewer's window presets need them)."""
    a = image.array
    if image.is_rgb:
        a = np.round(a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
        a = a.astype(np.uint8) if image.array.dtype == np.uint8 else a.astype(np.float32)
    elif a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0) and a.min() >= -32768 and a.max() <= 32767:
        a = a.astype(np.int16)   # integer-valued (HU): half the bytes of float32
    elif a.dtype.kind in "iu" and a.dtype.itemsize > 2 and a.min() >= -32768 and a.max() <= 32767:
        a = a.astype(np.int16)
    return image.with_array(a, is_rgb=False)


def to_image_grid(m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A map on the model's input grid resampled (linear) onto the image grid."""
    if tuple(m.shape) == tuple(shape):
        return m.astype(np.float32)
    if m.ndim == 2:
        return np.asarray(cv2.resize(m.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR))
    out = np.asarray(zoom(m.astype(np.float32), [t / s for t, s in zip(shape, m.shape)], order=1))
    return out[tuple(slice(0, s) for s in shape)]


def mask_measures(mask: np.ndarray, spacing) -> dict:
    """Foreground size in mm (area for 2D, volume for 3D) and the largest diameter (mm) of the largest component.

    ``spacing`` follows the array axes. The diameter is the largest distance between two foreground voxel
    centres of the largest connected component (over its convex hull when it has many voxels).
    """
    fg = mask > 0
    sp = np.asarray(spacing, float)
    n = int(fg.sum())
    cell = float(np.prod(sp))
    out: dict = {"foreground_voxels": n, "unit": "mm"}
    out["volume_mm3" if mask.ndim == 3 else "area_mm2"] = n * cell
    # scipy's annotations give label() one return type for every call; without `output` it is (labels, count)
    labels, k = cast(tuple[np.ndarray, int], ndimage.label(fg))
    out["components"] = int(k)
    if k == 0:
        out["max_diameter_mm"] = 0.0
        return out
    sizes = np.bincount(labels.ravel())[1:]
    big = labels == (int(np.argmax(sizes)) + 1)
    pts = np.argwhere(big).astype(float) * sp
    if len(pts) > 64:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # flat or degenerate components: Qhull refuses them; sample instead
            pts = pts[np.random.default_rng(0).choice(len(pts), min(len(pts), 2000), replace=False)]
    d = 0.0
    for i in range(0, len(pts), 512):
        diff = pts[i:i + 512, None, :] - pts[None, :, :]
        d = max(d, float(np.sqrt((diff ** 2).sum(-1)).max()))
    out["max_diameter_mm"] = d
    out["largest_component_voxels"] = int(sizes.max())
    return out


def sr_bytes(sr) -> bytes:
    """The DICOM file bytes of an SR dataset (written by ``medlens.report.dicom_sr.write_sr``)."""
    tmp = Path(tempfile.mkdtemp(prefix="medlens-sr-"))
    try:
        return write_sr(sr, tmp / "sr.dcm").read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sr_fhir_json(sr) -> str:
    """The FHIR R5 transaction Bundle of an SR, made from the SR file as written (``medlens.report.fhir``)."""
    tmp = Path(tempfile.mkdtemp(prefix="medlens-sr-"))
    try:
        bundle = sr_to_bundle(read_tid1500(write_sr(sr, tmp / "sr.dcm")))
        return bundle.model_dump_json(exclude_none=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
