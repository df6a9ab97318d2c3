"""DICOM files and series (pydicom + pylibjpeg), with geometry and Hounsfield units done right.

- Single files of any transfer syntax pydicom can decode; multi-frame (incl. enhanced CT/MR with
  per-frame geometry and rescale); MONOCHROME1 inverted so that higher is brighter; RGB kept.
- Series from a folder: grouped by SeriesInstanceUID; slices sorted by their position along the
  slice normal (ImagePositionPatient . (row x col cosines)), never by file name or InstanceNumber;
  missing, duplicate and unevenly spaced slices are refused with a message naming the gap (or
  loaded with a warning when ``on_gap="warn"``); RescaleSlope/Intercept give Hounsfield units,
  or the Modality LUT Sequence when a dataset has one (pydicom's ``apply_modality_lut``).
- Sizes are checked from the header before decoding (Rows x Columns x NumberOfFrames x
  SamplesPerPixel, times the slices of a series), and a deflated dataset is stream-inflated
  against a byte cap before pydicom reads it (``medlens.io.limits``). Each compressed frame's own
  codestream header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment table) must agree with
  those attributes before a decoder runs, and frames beyond NumberOfFrames are never decoded.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes,
                         JPEGTransferSyntaxes, RLELossless)

from medlens.errors import DataError, MedlensWarning
from medlens.io.formats import DICOM_SUFFIXES
from medlens.io.image import Image
from medlens.io.limits import (MAX_PIXELS_ENV, check_size, inflated_size, j2k_image_size, jpeg_frame_size,
                               max_pixels, rle_segments, shown)

log = logging.getLogger(__name__)

# what a malformed header can raise while pydicom parses it (anything else is a bug to report)
_PARSE_ERRORS = (EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
                 NotImplementedError, UnicodeError, OSError, struct.error)
# Non-identifying attributes copied into Image.meta (never patient, study or institution data).
SAFE_KEYWORDS = ("Modality", "SOPClassUID", "PhotometricInterpretation", "BitsStored", "Rows", "Columns",
                 "SliceThickness", "KVP", "ConvolutionKernel", "Manufacturer", "ManufacturerModelName",
                 "RescaleType", "WindowCenter", "WindowWidth", "NumberOfFrames", "BurnedInAnnotation",
                 "BodyPartExamined", "ImageType", "SamplesPerPixel")


def _read(path: Path, stop_before_pixels: bool = False):
    if not path.exists():
        raise DataError("file not found", shown(path))
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", shown(path))
    _check_deflated(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        return _read_without_preamble(path, stop_before_pixels)
    except Exception as e:  # truncated or mangled headers: struct.error, EOFError, ValueError, ...
        raise DataError(f"unreadable DICOM header ({type(e).__name__}: {_short(e)})", shown(path)) from e


def _read_without_preamble(path: Path, stop_before_pixels: bool):
    """Files without the 128-byte preamble (older ACR-NEMA style) are still DICOM if a forced parse
    finds image or SOP attributes; a text or other file does not pass this test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            looks_dicom = ("SOPClassUID" in ds or "Rows" in ds) and len(ds) > 3
    except (InvalidDicomError, *_PARSE_ERRORS) as e:
        raise DataError(f"not a DICOM file (no 'DICM' preamble and no valid header: {type(e).__name__})",
                        shown(path)) from None
    if not looks_dicom:
        raise DataError("not a DICOM file (no 'DICM' preamble and no valid header)", shown(path))
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if ds.is_implicit_VR
                                          else ExplicitVRLittleEndian if ds.is_little_endian
                                          else ExplicitVRBigEndian)
    return ds


def _check_deflated(path: Path) -> None:
    """A Deflated Explicit VR dataset is inflated whole by pydicom: stream it first against the byte cap."""
    with open(path, "rb") as fp:
        if fp.read(132)[128:132] != b"DICM":
            fp.seek(0)
        start = fp.tell()
        if fp.read(2) != b"\x02\x00":  # no file meta group: cannot be deflated
            return
        fp.seek(start)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                    stop_when=lambda tag, vr, length: tag.group != 2)
                deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        except _PARSE_ERRORS:
            return  # a broken file meta group: the full read reports it
        if deflated:
            inflated_size(iter(lambda: fp.read(1 << 20), b""), path)


def _short(e: Exception) -> str:
    s = " ".join(str(e).split())
    return s[:200] or type(e).__name__


def _safe_meta(ds) -> dict:
    meta = {}
    for kw in SAFE_KEYWORDS:
        v = ds.get(kw)
        if v is not None and v != "":
            meta[kw] = str(v) if not isinstance(v, (int, float)) else v
    return meta


def _float_list(v, n: int, what: str, path) -> list[float]:
    try:
        out = [float(x) for x in (v if hasattr(v, "__len__") and not isinstance(v, str) else [v])]
    except (TypeError, ValueError):
        raise DataError(f"{what} is not numeric ({v!r})", path) from None
    if len(out) != n or not all(np.isfinite(out)):
        raise DataError(f"{what} must have {n} finite values, got ({', '.join(f'{x:g}' for x in out)})", shown(path))
    return out


def _orientation(ds, path) -> np.ndarray:
    """3x3 direction matrix with columns (row direction, column direction, slice normal)."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        return np.eye(3)
    v = np.array(_float_list(iop, 6, "ImageOrientationPatient", path))
    r, c = v[:3], v[3:]
    if np.linalg.norm(r) < 1e-6 or np.linalg.norm(c) < 1e-6:
        raise DataError("ImageOrientationPatient has a zero direction", path)
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    return np.stack([r, c, np.cross(r, c)], axis=1)


def _slice_spacing(ds, path) -> float:
    """SpacingBetweenSlices, else SliceThickness, else 1 mm (0 counts as absent); NaN, infinite or negative is
    refused (it would become the volume's z spacing: NaN geometry downstream)."""
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        v = ds.get(kw)
        if v is None or v == "":
            continue
        try:
            z = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{kw} ({v}) is not a number", shown(path)) from None
        if z == 0:  # written by some scanners for "unknown"
            continue
        if not np.isfinite(z) or z < 0:
            raise DataError(f"{kw} ({z:g}) is not a finite positive number of millimetres; the slice spacing "
                            "cannot be known", shown(path))
        return z
    return 1.0


def _pixel_spacing(ds, path) -> tuple[float, float]:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is None:
        return 1.0, 1.0
    row, col = _float_list(ps, 2, "PixelSpacing", path)
    if row <= 0 or col <= 0:  # seen on real CR files: the image is fine, its calibration is unknown
        warnings.warn(f"{path.name}: PixelSpacing {list(ps)} is not positive; using 1.0 mm (uncalibrated)",
                      MedlensWarning)
        return 1.0, 1.0
    return row, col  # (between rows = y, between columns = x)


def _decode(ds, path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise DataError(f"no pixel data (SOP class: {sop}); not an image", path)
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError("pixel data without Rows/Columns attributes; cannot shape the image", path)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"bad image dimensions ({_short(e)})", path) from None
    if rows <= 0 or cols <= 0 or frames <= 0 or spp <= 0:
        raise DataError(f"implausible image size {frames}x{rows}x{cols}x{spp}", shown(path))
    check_size((frames, rows, cols) if frames > 1 else (rows, cols), path, samples=spp)
    ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    _check_codestreams(ds, path, ts, rows, cols, frames, spp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # frames beyond NumberOfFrames are neither checked above nor decoded (pydicom would by default)
            ds.pixel_array_options(allow_excess_frames=False)
            arr = ds.pixel_array
    except NotImplementedError as e:
        name = getattr(ts, "name", ts)
        raise DataError(f"cannot decode transfer syntax {name} ({_short(e)})", path) from None
    except Exception as e:
        name = getattr(ts, "name", ts)
        raise DataError(f"pixel data could not be decoded ({name}; {type(e).__name__}: {_short(e)}); "
                        "truncated or corrupt file?", path) from None
    return np.asarray(arr)


def _check_codestreams(ds, path, ts, rows: int, cols: int, frames: int, spp: int) -> None:
    """Compare each compressed frame's own header with Rows x Columns x SamplesPerPixel before decoding.

    A decoder sizes its output from the codestream (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, the RLE
    segment table), so a frame that claims more than the DICOM header, or more than
    ``MEDLENS_MAX_PIXELS``, is refused here: no decoder runs. Native (uncompressed) data is sized by
    the DICOM header itself (already checked).
    """
    if ts is None or not ts.is_compressed or ts.is_deflated:
        return
    if ts in JPEGTransferSyntaxes:
        kind, size_of = "JPEG", jpeg_frame_size
    elif ts in JPEGLSTransferSyntaxes:
        kind, size_of = "JPEG-LS", jpeg_frame_size
    elif ts in JPEG2000TransferSyntaxes:
        kind, size_of = "JPEG 2000", j2k_image_size
    elif ts == RLELossless:
        kind, size_of = "RLE", None
    else:
        raise DataError(f"transfer syntax {getattr(ts, 'name', ts)} is not one medlens can size-check before "
                        "decoding; refused", shown(path))
    if "PixelData" not in ds:
        return
    ext = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    header = f"the DICOM header says {rows} x {cols} x {spp} (Rows x Columns x SamplesPerPixel)"
    n = 0
    try:
        for data in generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=ext):
            n += 1
            where = f"frame {n} of {frames}" if frames > 1 else "the frame"
            if size_of is None:
                _check_rle(data, where, header, rows, cols, spp, int(ds.get("BitsAllocated") or 8), path)
            else:
                try:
                    h, w, c = size_of(data)
                except (ValueError, struct.error) as e:
                    raise DataError(f"{where}: unreadable {kind} codestream header ({e}); not decoded",
                                    shown(path)) from None
                claimed = f"{kind} codestream of {where} says {h} x {w} x {c}"
                limit = max_pixels()
                if h * w * c > limit:
                    raise DataError(f"the {claimed} = {h * w * c:,} pixels, over the limit of {limit:,} (raise "
                                    f"{MAX_PIXELS_ENV} to allow it); {header}: refused before decoding",
                                    shown(path))
                if (h, w, c) != (rows, cols, spp):
                    raise DataError(f"the {claimed} but {header}: refused before decoding (a corrupt or "
                                    "crafted file)", shown(path))
            if n == frames:
                break
    except DataError:
        raise
    except (ValueError, TypeError, struct.error, EOFError, IndexError) as e:
        raise DataError(f"malformed encapsulated pixel data ({type(e).__name__}: {_short(e)}); not decoded",
                        shown(path)) from None
    if n < frames:
        raise DataError(f"the encapsulated pixel data holds {n} frame(s), NumberOfFrames says {frames}; not decoded",
                        shown(path))


def _check_rle(data: bytes, where: str, header: str, rows: int, cols: int, spp: int, bits: int, path) -> None:
    """An RLE frame has one segment per byte plane (SamplesPerPixel x BitsAllocated / 8), each of which
    decodes to Rows x Columns bytes. The longest sane encoding of a plane is twice its size (a run of one
    literal byte costs two bytes); a longer segment decodes to more than the plane (up to 64 bytes for
    each of its bytes), so it is refused."""
    try:
        segments = rle_segments(data)
    except (ValueError, struct.error) as e:
        raise DataError(f"{where}: unreadable RLE header ({e}); not decoded", shown(path)) from None
    want = spp * max(1, -(-bits // 8))
    if len(segments) != want:
        raise DataError(f"the RLE header of {where} names {len(segments)} segment(s), but {header} with "
                        f"BitsAllocated {bits} needs {want}: refused before decoding", shown(path))
    plane = rows * cols
    most = 2 * plane + 2
    for k, (a, b) in enumerate(segments):
        if b - a > most:
            raise DataError(f"RLE segment {k + 1} of {where} is {b - a:,} bytes, more than a {rows} x {cols} plane "
                            f"can take ({most:,}); {header}: refused before decoding", shown(path))


def _rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality units (HU for CT): int16 when the result fits exactly, else float32."""
    if slope == 1.0 and intercept == int(intercept):
        amin, amax = int(arr.min(initial=0)), int(arr.max(initial=0))
        lo, hi = amin + int(intercept), amax + int(intercept)
        if -32768 <= min(lo, amin) and max(hi, amax) <= 32767:
            out = arr.astype(np.int16)
            out += np.int16(intercept)
            return out
        return arr.astype(np.int32) + int(intercept)
    out = arr.astype(np.float32)
    out *= np.float32(slope)
    out += np.float32(intercept)
    return out


def _apply_modality_lut(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    """Stored values through the dataset's Modality LUT Sequence (PS3.3 C.11.1), by pydicom."""
    try:
        return np.asarray(apply_modality_lut(arr, ds))
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise DataError(f"invalid Modality LUT Sequence ({type(e).__name__}: {_short(e)})", shown(path)) from None


def _modality_units(arr: np.ndarray, ds, path: Path, modality: str) -> np.ndarray:
    """Stored values -> modality units (HU for CT): the Modality LUT when present, else slope/intercept."""
    if "ModalityLUTSequence" in ds:
        return _apply_modality_lut(arr, ds, path)
    slope, intercept = _slope_intercept(ds)
    if (slope, intercept) != (1.0, 0.0) or modality == "CT":
        return _rescale(arr, slope, intercept)
    return arr


def _slope_intercept(ds) -> tuple[float, float]:
    try:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return 1.0, 0.0


def _invert_monochrome1(arr: np.ndarray, ds) -> np.ndarray:
    bits = int(ds.get("BitsStored") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return ((2**bits - 1) - arr.astype(np.int64)).astype(arr.dtype)
    return (-arr.astype(np.int64)).astype(arr.dtype)


def read_dicom_file(path: str | Path) -> Image:
    """One DICOM file: a 2D image, a multi-frame volume, or an RGB image."""
    path = Path(path)
    ds = _read(path)
    try:
        return _image_from_dataset(ds, path)
    except DataError:
        raise
    except Exception as e:  # any other malformed attribute
        raise DataError(f"invalid DICOM image attributes ({type(e).__name__}: {_short(e)})", path) from e


def _image_from_dataset(ds, path: Path) -> Image:
    arr = _decode(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    rgb = spp == 3
    modality = str(ds.get("Modality", "OT") or "OT")
    meta = _safe_meta(ds)
    meta["source"] = path.name
    if photometric == "MONOCHROME1":
        arr = _invert_monochrome1(arr, ds)
        meta["inverted_monochrome1"] = True
    direction = _orientation(ds, path)
    row_sp, col_sp = _pixel_spacing(ds, path)
    if frames > 1 and not rgb:
        return _multiframe(ds, arr, direction, row_sp, col_sp, modality, meta, path)
    if frames > 1 and rgb:  # RGB cine (ultrasound): (frames, y, x, 3), no 3D geometry
        return Image(arr, spacing=(1.0, row_sp, col_sp), modality=modality, meta=meta, is_rgb=True)
    if not rgb:
        arr = _modality_units(arr, ds, path, modality)
    ipp = ds.get("ImagePositionPatient")
    origin = _float_list(ipp, 3, "ImagePositionPatient", path) if ipp is not None else [0.0, 0.0, 0.0]
    meta["origin_3d"] = origin
    meta["direction_3d"] = direction.tolist()
    return Image(arr, spacing=(row_sp, col_sp), origin=tuple(origin[:2]), direction=direction[:2, :2],
                 modality=modality, meta=meta, is_rgb=rgb)


def _multiframe(ds, arr, direction, row_sp, col_sp, modality, meta, path) -> Image:
    """Multi-frame (enhanced CT/MR): per-frame positions and rescale from the functional groups."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence")

    def group(fg, name):
        if fg is not None and name in fg and len(fg[name].value):
            return fg[name].value[0]
        return None

    def lookup(i, name):
        item = group(per[i], name) if per is not None and i < len(per) else None
        return item if item is not None else group(shared, name)

    n = arr.shape[0]
    po = lookup(0, "PlaneOrientationSequence")
    if po is not None and "ImageOrientationPatient" in po:
        direction = _orientation(po, path)
    pm = lookup(0, "PixelMeasuresSequence")
    if pm is not None and "PixelSpacing" in pm:
        row_sp, col_sp = _pixel_spacing(pm, path)
    positions, slopes = [], []
    for i in range(n):
        pp = lookup(i, "PlanePositionSequence")
        positions.append(_float_list(pp.ImagePositionPatient, 3, "ImagePositionPatient", path)
                         if pp is not None and "ImagePositionPatient" in pp else None)
        pv = lookup(i, "PixelValueTransformationSequence")
        slopes.append(_slope_intercept(pv) if pv is not None else _slope_intercept(ds))
    if "ModalityLUTSequence" in ds:
        arr = _apply_modality_lut(arr, ds, path)
    elif any(s != (1.0, 0.0) for s in slopes) or modality == "CT":
        if len(set(slopes)) == 1:
            arr = _rescale(arr, *slopes[0])
        else:
            arr = np.stack([_rescale(arr[i], *slopes[i]).astype(np.float32) for i in range(n)])
    origin = [0.0, 0.0, 0.0]
    if all(p is not None for p in positions) and n > 1:
        pos = np.array(positions)
        d = pos @ direction[:, 2]
        order = np.argsort(d, kind="stable")
        arr, pos, d = arr[order], pos[order], d[order]
        steps = np.diff(d)
        if np.any(steps <= 1e-4):
            raise DataError("multi-frame image has frames at duplicate positions", path)
        z_sp = float(np.median(steps))
        if np.abs(steps - z_sp).max() > 0.01 * z_sp + 1e-3:
            warnings.warn(f"{path.name}: frame spacing is not uniform ({steps.min():.3f}-{steps.max():.3f} mm)",
                          MedlensWarning)
        origin = pos[0].tolist()
        meta["frame_order"] = order.tolist()
    else:
        z_sp = _slice_spacing(ds, path)
        if positions and positions[0] is not None:
            origin = positions[0]
    return Image(arr, spacing=(z_sp, row_sp, col_sp), origin=tuple(origin), direction=direction,
                 modality=modality, meta=meta)


# ----------------------------------------------------------------------------------------- series


@dataclass
class SeriesInfo:
    """One series found in a folder (no patient data)."""

    series_uid: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    description: str = ""
    rows: int = 0
    columns: int = 0

    @property
    def short_id(self) -> str:
        return hashlib.sha1(self.series_uid.encode()).hexdigest()[:8]


def _dicom_candidates(folder: Path) -> list[Path]:
    """Files under ``folder`` that may be DICOM; hidden files and folders (unfinished writes) are skipped."""
    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [p for p in files if p.suffix.lower() in DICOM_SUFFIXES | {""} or p.suffix[1:].isdigit()]


def scan_series(folder: Path, with_pixels: bool) -> dict[str, tuple[SeriesInfo, list]]:
    """Read every DICOM file under ``folder`` once; group (path, dataset) pairs by SeriesInstanceUID."""
    if not folder.is_dir():
        raise DataError("not a folder", folder)
    groups: dict[str, tuple[SeriesInfo, list]] = {}
    for p in _dicom_candidates(folder):
        try:
            ds = _read(p, stop_before_pixels=not with_pixels)
        except DataError:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            continue
        if uid not in groups:
            groups[uid] = (SeriesInfo(uid, modality=str(ds.get("Modality", "")),
                                      description=str(ds.get("SeriesDescription", "") or ""),
                                      rows=int(ds.get("Rows") or 0), columns=int(ds.get("Columns") or 0)), [])
        groups[uid][0].files.append(p)
        groups[uid][1].append((p, ds))
    return groups


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Group the DICOM files of a folder (recursively) by SeriesInstanceUID; non-DICOM files are skipped."""
    return sorted((g[0] for g in scan_series(Path(folder), False).values()), key=lambda s: -len(s.files))


def read_dicom_series(folder: str | Path, series_uid: str | None = None, on_gap: str = "error",
                      tolerance: float = 0.01) -> Image:
    """Read a DICOM series from a folder into a (z, y, x) volume in modality units (HU for CT).

    Args:
        folder: folder holding the slices (searched recursively).
        series_uid: which series, when the folder holds several (the full UID or its 8-character
            short id shown by ``medlens info``).
        on_gap: ``"error"`` (default) refuses missing or unevenly spaced slices; ``"warn"`` loads
            them anyway with the median spacing and a warning.
        tolerance: allowed relative deviation of slice spacing.
    """
    folder = Path(folder)
    groups = scan_series(folder, True)
    series = sorted((g[0] for g in groups.values()), key=lambda s: -len(s.files))
    if not series:
        raise DataError("no DICOM files with a SeriesInstanceUID in this folder", folder)
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(f"{s.short_id} ({s.modality}, {len(s.files)} files)" for s in series)
            raise DataError(f"folder holds {len(series)} series; choose one with --series ID: {listing}", folder)
        chosen = series[0]
    else:
        match = [s for s in series if s.series_uid == series_uid or s.short_id == series_uid]
        if not match:
            raise DataError(f"no series '{series_uid}' here (has {', '.join(s.short_id for s in series)})", folder)
        chosen = match[0]
    return _assemble(chosen, groups[chosen.series_uid][1], folder, on_gap, tolerance)


def _assemble(series: SeriesInfo, slices: list, folder: Path, on_gap: str, tolerance: float) -> Image:
    for p, ds in slices:
        if "PixelData" not in ds:
            raise DataError("slice has no pixel data", p)
    p0, ds0 = slices[0]
    direction = _orientation(ds0, p0)
    normal = direction[:, 2]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    row_sp, col_sp = _pixel_spacing(ds0, p0)
    entries = []
    for p, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DataError(f"slice is {ds.Rows}x{ds.Columns}, the series is {rows}x{cols}", p)
        if not np.allclose(_orientation(ds, p), direction, atol=1e-3):
            raise DataError("slice orientation differs from the rest of the series (a localizer?)", p)
        if ds.get("ImagePositionPatient") is None:
            raise DataError("slice lacks ImagePositionPatient; cannot order the series", p)
        ipp = np.array(_float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient", p))
        entries.append((float(ipp @ normal), ipp, p, ds))
    entries.sort(key=lambda e: e[0])
    # duplicates: the same position twice
    dedup = []
    for e in entries:
        if dedup and abs(e[0] - dedup[-1][0]) < 1e-3:
            same = str(e[3].get("SOPInstanceUID")) == str(dedup[-1][3].get("SOPInstanceUID"))
            if same:
                log.warning("%s duplicates %s (same SOPInstanceUID); ignored", e[2].name, dedup[-1][2].name)
                continue
            raise DataError(f"two different slices at the same position {e[0]:.2f} mm: {dedup[-1][2].name} and "
                            f"{e[2].name}", folder)
        dedup.append(e)
    entries = dedup
    pos = np.array([e[0] for e in entries])
    if len(entries) > 1:
        steps = np.diff(pos)
        dz = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - dz) > tolerance * dz + 1e-3)
        if len(bad):
            i = int(bad[0])
            gap = steps[i]
            n_missing = int(round(gap / dz)) - 1
            what = (f"{n_missing} missing slice(s)" if n_missing >= 1 and abs(gap - (n_missing + 1) * dz) < 0.1 * dz
                    else "uneven slice spacing")
            msg = (f"{what} between {entries[i][2].name} (at {pos[i]:.2f} mm) and {entries[i + 1][2].name} "
                   f"(at {pos[i + 1]:.2f} mm): gap {gap:.2f} mm, expected {dz:.2f} mm"
                   + (f"; {len(bad)} such gaps in all" if len(bad) > 1 else ""))
            if on_gap != "warn":
                raise DataError(msg + " (use on_gap='warn' / --allow-gaps to load anyway)", folder)
            warnings.warn(f"{folder}: {msg}; loaded with median spacing", MedlensWarning)
    else:
        dz = _slice_spacing(ds0, p0)
    check_size((len(entries), rows, cols), folder)
    # pixels: fast path for native little-endian uncompressed data, else pydicom's decoders
    arrays = []
    slopes = {_slope_intercept(e[3]) for e in entries}
    for _, _, p, ds in entries:
        arr = _fast_native(ds)
        if arr is None:
            arr = _decode(ds, p)
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
            arr = _invert_monochrome1(arr, ds)
        arrays.append(arr)
    vol = np.stack(arrays)
    modality = str(ds0.get("Modality", "OT") or "OT")
    if any("ModalityLUTSequence" in e[3] for e in entries):
        vol = np.stack([_modality_units(a, e[3], e[2], modality) for a, e in zip(arrays, entries)])
    elif len(slopes) == 1:
        slope, intercept = slopes.pop()
        if (slope, intercept) != (1.0, 0.0) or modality == "CT":
            vol = _rescale(vol, slope, intercept)
    else:  # per-slice rescale (some scanners vary it)
        vol = np.stack([_rescale(a, *_slope_intercept(e[3])).astype(np.float32) for a, e in zip(arrays, entries)])
    meta = _safe_meta(ds0)
    meta.update(source=folder.name, n_files=len(entries), series_uid=series.series_uid,
                series_short_id=series.short_id, files=[e[2].name for e in entries])
    return Image(vol, spacing=(dz, row_sp, col_sp), origin=tuple(entries[0][1]), direction=direction,
                 modality=modality, meta=meta)


def _fast_native(ds) -> np.ndarray | None:
    """Uncompressed little-endian monochrome pixel data straight from the bytes (no copy-heavy decode)."""
    try:
        ts = ds.file_meta.TransferSyntaxUID
        if ts.is_compressed or not ts.is_little_endian or int(ds.get("SamplesPerPixel") or 1) != 1:
            return None
        if int(ds.get("NumberOfFrames") or 1) != 1 or int(ds.BitsAllocated) not in (8, 16, 32):
            return None
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        dtype = np.dtype(f"{'i' if signed else 'u'}{bits_alloc // 8}").newbyteorder("<")
        n = int(ds.Rows) * int(ds.Columns)
        buf = ds.PixelData
        if len(buf) < n * dtype.itemsize:
            return None
        arr = np.frombuffer(buf, dtype=dtype, count=n).reshape(int(ds.Rows), int(ds.Columns))
        if bits_stored < bits_alloc:  # mask unused high bits, sign-extend when signed
            if signed:
                shift = bits_alloc - bits_stored
                arr = (arr << shift) >> shift
            else:
                arr = arr & ((1 << bits_stored) - 1)
        return arr.astype(dtype.newbyteorder("="), copy=False)
    except (AttributeError, KeyError, TypeError, ValueError):  # no file meta, odd attributes: the full decoder
        return None


# ------------------------------------------------------------------------------------- one subject

# The attributes that must hold one value across the instances of a series before any result is
# issued for it: an SR/SEG/FHIR resource names one patient, one study and one frame of reference.
SUBJECT_KEYWORDS = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")


def require_single_subject(datasets, what: str | Path = "series") -> None:
    """Refuse instances that belong to more than one patient, study or frame of reference.

    ``datasets`` are pydicom datasets (headers are enough). A missing attribute counts as one more
    value only when some other instance has it. The message names the attribute and the number of
    distinct values, never a value (no identifier leaves medlens in an error).
    """
    for key in SUBJECT_KEYWORDS:
        values = {str(getattr(ds, key, "") or "").strip() for ds in datasets}
        if len(values) > 1:
            raise DataError(f"instances carry {len(values)} different {key} values; one series must belong "
                            "to one patient, study and frame of reference, so no result is issued for it", what)
