"""Writers: NIfTI / MHD / NRRD (SimpleITK), windowed PNG, and a DICOM series with correct geometry."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage,
                         generate_uid)

from medlens.errors import DataError
from medlens.io.image import Image
from medlens.io.formats import SITK_SUFFIXES, suffix_of
from medlens.io.limits import require_utf8, shown
from medlens.io.sitk_io import write_sitk
from medlens.io.windows import apply_window, to_uint8
from medlens.utils import atomic_dir, atomic_path


def write_png(image: Image | np.ndarray, path: str | Path, window: str | tuple[float, float] | None = None,
              slice_index: int | None = None) -> Path:
    """Write a 2D image (or one axial slice of a volume) as an 8-bit PNG, windowed for display."""
    arr = image.array if isinstance(image, Image) else np.asarray(image)
    rgb = isinstance(image, Image) and image.is_rgb
    if (arr.ndim == 3 and not rgb) or arr.ndim == 4:
        arr = arr[arr.shape[0] // 2 if slice_index is None else slice_index]
    if rgb or (arr.ndim == 3 and arr.shape[-1] == 3):
        out = arr if arr.dtype == np.uint8 else to_uint8(arr)
    elif window is not None:
        out = (apply_window(arr, window) * 255).round().astype(np.uint8)
    else:
        out = arr if arr.dtype == np.uint8 else to_uint8(arr)
    with atomic_path(path) as tmp:
        PILImage.fromarray(out).save(tmp, format="PNG")
    return Path(path)


def write_dicom_series(image: Image, folder: str | Path, modality: str | None = None,
                       series_description: str = "medlens export") -> list[Path]:
    """Write a (z, y, x) volume as a DICOM series (one CT/MR Image Storage file per slice).

    Geometry is exact: ImagePositionPatient of slice k is the world position of voxel (k, 0, 0),
    ImageOrientationPatient comes from the direction matrix, PixelSpacing = (y, x) spacing.
    Values are stored as int16 with RescaleSlope/Intercept chosen to represent them. Patient
    attributes are placeholders ("ANONYMOUS"); new UIDs are generated.

    ``folder`` must be new or empty. The slices are written into a hidden temporary folder beside it
    that is renamed to ``folder`` only when every slice is written: a run killed part-way never
    leaves a folder that reads as a complete, shorter series.
    """
    if image.spatial_dims != 3 or image.is_rgb:
        raise DataError("a DICOM series needs a scalar 3D volume")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError("output folder exists and is not empty; choose a new or empty folder", shown(folder))
    modality = (modality or image.modality or "OT").upper()
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)
    arr = image.array
    if np.issubdtype(arr.dtype, np.integer) and arr.min() >= -32768 and arr.max() <= 32767:
        stored, slope, intercept = arr.astype(np.int16), 1.0, 0.0
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        slope = (hi - lo) / 65534.0 if hi > lo else 1.0
        intercept = lo + 32767 * slope
        stored = np.round((arr - intercept) / slope).clip(-32768, 32767).astype(np.int16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = _dt.datetime.now()
    d = np.asarray(image.direction)
    iop = [*d[:, 0], *d[:, 1]]
    names = []
    with atomic_dir(folder) as tmp_folder:
        for k in range(arr.shape[0]):
            names.append(_write_slice(tmp_folder / f"slice_{k:04d}.dcm", image, k, stored[k], sop_class, modality,
                                      series_description, (study, series, frame), now, iop, slope, intercept))
    return [folder / n for n in names]


def _write_slice(fname: Path, image: Image, k: int, pixels: np.ndarray, sop_class, modality: str,
                 series_description: str, uids, now, iop, slope: float, intercept: float) -> str:
    study, series, frame = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(fname), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID = "ANONYMOUS", "ANONYMOUS"
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in image.voxel_to_world([k, 0, 0])]
    ds.PixelSpacing = [f"{image.spacing[1]:.6f}", f"{image.spacing[2]:.6f}"]
    ds.SliceThickness = f"{image.spacing[0]:.6f}"
    ds.SpacingBetweenSlices = f"{image.spacing[0]:.6f}"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    if modality == "CT":
        ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    pydicom.dcmwrite(fname, ds, enforce_file_format=True)
    return fname.name


_OUTPUT_HINT = "use .nii.gz, .nii, .mhd, .nrrd, .png, .npy or a folder for a DICOM series"


def check_output(path: str | Path) -> None:
    """Refuse, before any work is done, an output path that ``save`` could not write."""
    path = Path(path)
    sfx = suffix_of(path)
    if sfx in SITK_SUFFIXES:
        require_utf8(path, "output path")
    elif sfx in ("", ".dcm"):
        folder = path.with_suffix("") if sfx else path
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DataError("output folder exists and is not empty; choose a new or empty folder", shown(folder))
    elif sfx not in (".png", ".npy"):
        raise DataError(f"unsupported output format '{sfx}' ({_OUTPUT_HINT})", shown(path))


def save(image: Image, path: str | Path, window=None) -> Path | list[Path]:
    """Write ``image`` in the format named by the path's suffix; a path without suffix = a DICOM series folder."""
    path = Path(path)
    sfx = suffix_of(path)
    if sfx in SITK_SUFFIXES:
        return write_sitk(image, path)
    if sfx in (".png",):
        return write_png(image, path, window)
    if sfx in (".npy",):
        with atomic_path(path) as tmp:
            np.save(tmp, image.array)
        return path
    if sfx == "" or sfx == ".dcm" and image.spatial_dims == 3:
        return write_dicom_series(image, path.with_suffix("") if sfx else path)
    raise DataError(f"unsupported output format '{sfx}' ({_OUTPUT_HINT})", shown(path))
