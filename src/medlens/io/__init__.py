"""Medical image I/O: ``load(path) -> Image`` for every supported format, and ``save``.

Formats: DICOM files (any transfer syntax pydicom + pylibjpeg decode; multi-frame; MONOCHROME1;
RGB), DICOM series (a folder), MHD/RAW, NRRD, NIfTI (.nii, .nii.gz), PNG/JPEG/TIFF (8/16 bit),
NPZ/NPY. See ``medlens.io.image`` for the axis and geometry conventions.

What every input must satisfy before it is decoded (size limits from ``MEDLENS_MAX_PIXELS``,
``MEDLENS_MAX_VOXELS`` and ``MEDLENS_MAX_DECOMPRESSED_BYTES``; finite values; valid spacing; MHD/NRRD
data files inside their folder; UTF-8 paths for SimpleITK) is in ``medlens.io.limits``.
"""

from __future__ import annotations

from pathlib import Path

from medlens.errors import DataError, MedlensError
from medlens.io.dicom import read_dicom_file, read_dicom_series
from medlens.io.formats import ARRAY_SUFFIXES, DICOM_SUFFIXES, RASTER_SUFFIXES, SITK_SUFFIXES, suffix_of
from medlens.io.image import Image
from medlens.io.limits import check_finite, shown
from medlens.io.raster import read_npz_image, read_raster
from medlens.io.sitk_io import orientation_code, read_sitk, reorient, resample
from medlens.io.writers import save, write_dicom_series, write_png

__all__ = ["Image", "load", "save", "resample", "reorient", "orientation_code", "write_png", "write_dicom_series"]


def _looks_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def load(path: str | Path, *, allow_nonfinite: bool = False, allow_outside: bool = False, **kwargs) -> Image:
    """Load a medical image file, or a DICOM series from a folder, as an ``Image``.

    ``allow_nonfinite``: load NaN/inf values with a warning instead of refusing them (an image
    with no finite value is refused all the same). ``allow_outside``: read an MHD/NRRD header whose
    data file lies outside its folder. Other keyword arguments go to the reader: ``series_uid``
    and ``on_gap`` for DICOM folders, ``key``/``index`` for NPZ. Sizes are checked from headers
    against ``MEDLENS_MAX_PIXELS`` / ``MEDLENS_MAX_VOXELS`` (see ``medlens.io.limits``).
    Any failure raises ``DataError`` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", shown(path))
    try:
        image = _read(path, allow_nonfinite, allow_outside, kwargs)
    except MedlensError:
        raise
    except MemoryError:
        raise DataError("image too large to load into memory", shown(path)) from None
    except Exception as e:  # a reader bug or a malformed file the reader did not anticipate
        raise DataError(f"could not read ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                        shown(path)) from e
    if path.is_dir() or suffix_of(path) not in SITK_SUFFIXES:  # read_sitk has checked its own
        check_finite(image.array, path, allow_nonfinite)
    return image


def _read(path: Path, allow_nonfinite: bool, allow_outside: bool, kwargs: dict) -> Image:
    if path.is_dir():
        return read_dicom_series(path, **kwargs)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", shown(path))
    sfx = suffix_of(path)
    if sfx in RASTER_SUFFIXES:
        return read_raster(path)
    if sfx in ARRAY_SUFFIXES:
        return read_npz_image(path, **kwargs)
    if sfx in SITK_SUFFIXES:
        return read_sitk(path, allow_nonfinite=allow_nonfinite, allow_outside=allow_outside)
    if sfx in DICOM_SUFFIXES or _looks_dicom(path) or sfx == "":
        return read_dicom_file(path)
    raise DataError(f"unsupported file type '{sfx}'", shown(path))
