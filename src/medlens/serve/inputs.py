"""Uploaded bytes -> an ``Image``: the kind is sniffed from the content (never trusted from the name or the
client's content type), the bytes are written to a private temporary folder under a fixed name and read by
``medlens.io.load``, so the server reads exactly what the command line reads, with the same size limits.

Kinds: PNG, JPEG, TIFF, DICOM (a file, or several files of one series), NIfTI (``.nii`` or gzip). Anything
else is ``UnsupportedMedia`` (HTTP 415). Client file names never reach the disk or the logs. The files of a
series must belong to one patient, study and frame of reference (``medlens.io.dicom.require_single_subject``).

Temporary files are named ``medlens-upload-<pid>-*`` (``medlens-out-<pid>-*`` for answers) in the system's
temporary folder and removed when the request ends, whatever way it ends; ``remove_stale_spools`` removes at
start-up those of medlens processes that no longer run (a ``kill -9`` mid-upload), ``remove_own_spool`` this
process's at exit.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medlens.errors import DataError, MedlensError, ShapeError
from medlens.io import load
from medlens.io.dicom import SUBJECT_KEYWORDS, require_single_subject
from medlens.io.dicom_sources import dicom_sources, is_dicom_input
from medlens.io.image import Image
from medlens.utils import remove_pid_named


class UnsupportedMedia(MedlensError):
    """The upload is not an image format the server reads (HTTP 415)."""


@dataclass
class Upload:
    data: bytes
    filename: str = ""     # only used for its suffix when the content does not say (never logged)


def sniff(data: bytes) -> str:
    """'png', 'jpeg', 'tiff', 'dicom', 'nifti' or 'nifti-gz' from the first bytes; '' when unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x1f\x8b"):
        return "nifti-gz" if _nifti_header(_nifti_head(data, "nifti-gz")) else ""
    return "nifti" if _nifti_header(data[:352]) else ""


def small_png(uploads: list[Upload], max_pixels: int = 512 * 512) -> bool:
    """One PNG whose header declares at most ``max_pixels``: cheap enough to decode on the event loop."""
    if len(uploads) != 1 or len(uploads[0].data) < 24 or sniff(uploads[0].data) != "png":
        return False
    w, h = struct.unpack(">II", uploads[0].data[16:24])
    return w * h <= max_pixels


def _nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    size = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
    if 348 in size:
        return head[344:347] in (b"n+1", b"ni1")
    return 540 in size and head[4:7] in (b"n+2", b"ni2")


def nifti_channels(head: bytes) -> int:
    """Values per voxel of a NIfTI-1 header (the product of dimensions 4 and up); 1 when it has none."""
    little = struct.unpack("<i", head[:4])[0] == 348
    dims = struct.unpack(("<" if little else ">") + "8h", head[40:56])
    n = 1
    for d in dims[4:dims[0] + 1] if 0 < dims[0] <= 7 else ():
        n *= max(int(d), 1)
    return n


SPOOL_RE = re.compile(r"^medlens-(?:upload|out)-(\d+)-")


def spool_prefix(kind: str = "upload") -> str:
    """The name prefix of this process's temporary files (its PID in it, so a later start can tell them stale)."""
    return f"medlens-{kind}-{os.getpid()}-"


def remove_stale_spools(root: str | Path | None = None) -> int:
    """Remove the temporary upload/answer files and folders of medlens processes that no longer run (only
    names ``medlens-upload-<pid>-*`` / ``medlens-out-<pid>-*`` owned by this user, whose PID is not a live
    process; links are never followed). Returns how many were removed."""
    return remove_pid_named(root or tempfile.gettempdir(), SPOOL_RE)


def remove_own_spool(root: str | Path | None = None) -> int:
    """Remove this process's temporary files (at exit; requests remove their own as they end)."""
    me = os.getpid()
    return remove_pid_named(root or tempfile.gettempdir(), SPOOL_RE, lambda pid: pid == me)


SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii", "nifti-gz": ".nii.gz"}


def read_uploads(uploads: list[Upload], in_channels: int | None = None, sources: list | None = None
                 ) -> tuple[Image, str]:
    """The image of one upload, or of a multi-file DICOM series; returns (image, kind).

    ``sources``: a list that receives the DICOM instances (without pixel data, ordered like the image's z axis)
    the image was read from, for a DICOM SR of the result; refused for other kinds of input."""
    if not uploads:
        raise DataError("no file uploaded (send multipart/form-data with one or more 'file' parts)")
    kinds = [sniff(u.data) for u in uploads]
    for k in kinds:
        if not k:
            raise UnsupportedMedia("the upload is not an image medlens reads (PNG, JPEG, TIFF, DICOM, NIfTI)")
    if len(uploads) > 1 and set(kinds) != {"dicom"}:
        raise DataError("several files are read as one DICOM series; every part must be a DICOM file")
    kind = kinds[0]
    if kind.startswith("nifti") and in_channels is not None:
        c = nifti_channels(_nifti_head(uploads[0].data, kind))
        if c > 1 and c != in_channels:
            raise ShapeError(f"the image has {c} values (channels) per voxel; the model takes {in_channels}")
    if len(uploads) == 1:   # one private file (a temporary folder per request costs more than the model)
        fd, name = tempfile.mkstemp(prefix=spool_prefix(), suffix=SUFFIX[kind])
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(uploads[0].data)
            image = load(path)
            if sources is not None:
                sources.extend(_dicom_sources(path, image, kind))
        except MedlensError as e:
            raise type(e)(_without_tmp(str(e), path, "upload" + SUFFIX[kind])) from None
        finally:
            path.unlink(missing_ok=True)
        return image, kind
    tmp = Path(tempfile.mkdtemp(prefix=spool_prefix()))
    folder = tmp / "series"
    try:
        folder.mkdir()
        for i, u in enumerate(uploads):
            (folder / f"{i:05d}.dcm").write_bytes(u.data)
        _one_subject(folder)
        image = load(folder)
        if sources is not None:
            sources.extend(_dicom_sources(folder, image, "dicom"))
    except MedlensError as e:
        raise type(e)(_without_tmp(_without_tmp(str(e), folder, "upload", inside=True), tmp, "upload")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image, "dicom-series"


def _one_subject(folder: Path) -> None:
    """Refuse a series whose files carry more than one PatientID, StudyInstanceUID or FrameOfReferenceUID
    (headers only, before any pixel is decoded; the message names the attribute, never a value)."""
    datasets = []
    for f in sorted(folder.iterdir()):
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(SUBJECT_KEYWORDS)))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue    # io.load names the file that does not read
    require_single_subject(datasets, "upload")


def _dicom_sources(path: Path, image: Image, kind: str) -> list:
    if kind != "dicom" or not is_dicom_input(path, image):
        raise DataError("format=dicom-sr and format=fhir need DICOM input (a DICOM file or every file of a "
                        "series)")
    return dicom_sources(path, image)


def _nifti_head(data: bytes, kind: str) -> bytes:
    if kind == "nifti":
        return data[:352]
    try:
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read(352)
    except (OSError, EOFError):
        return b""


def _without_tmp(message: str, tmp: Path, shown: str, inside: bool = False) -> str:
    """Error text with the server's temporary path replaced by ``shown`` (clients see no server paths);
    ``inside``: names of files inside the folder lose the folder's path."""
    p = str(tmp)
    if inside:
        message = message.replace(p + "/", "")
    return message.replace(p, shown)
