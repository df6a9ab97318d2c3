"""Medical image I/O: ``load(path) -> Image`` for every supported format, and ``save``.

Formats: DICOM files (any transfer syntax pydicom + pylibjpeg decode; multi-frame; MONOCHROME1;
RGB), DICOM series (a folder), MHD/RAW, NRRD, NIfTI (.nii, .nii.gz), PNG/JPEG/TIFF (8/16 bit),
NPZ/NPY. See ``medlens.io.image`` for the axis and geometry conventions.
"""

from __future__ import annotations

from pathlib import Path

from medlens.errors import DataError, MedlensError
from medlens.io.image import Image
from medlens.io.raster import RASTER_SUFFIXES, read_npz_image, read_raster
from medlens.io.sitk_io import SITK_SUFFIXES, _suffix, orientation_code, read_sitk, reorient, resample
from medlens.io.writers import save, write_dicom_series, write_png

__all__ = ["Image", "load", "save", "resample", "reorient", "orientation_code", "write_png", "write_dicom_series"]

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}


def _looks_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def load(path: str | Path, **kwargs) -> Image:
    """Load a medical image file, or a DICOM series from a folder, as an ``Image``.

    Keyword arguments go to the reader: ``series_uid`` and ``on_gap`` for DICOM folders,
    ``allow_nonfinite`` for NIfTI/MHD/NRRD, ``key``/``index`` for NPZ.
    Any failure raises ``DataError`` naming the file and the problem.
    """
    from medlens.io.dicom import read_dicom_file, read_dicom_series

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        if path.is_dir():
            return read_dicom_series(path, **kwargs)
        if path.stat().st_size == 0:
            raise DataError("empty file (0 bytes)", path)
        sfx = _suffix(path)
        if sfx in RASTER_SUFFIXES:
            return read_raster(path)
        if sfx in (".npz", ".npy"):
            return read_npz_image(path, **kwargs)
        if sfx in SITK_SUFFIXES:
            return read_sitk(path, **kwargs)
        if sfx in DICOM_SUFFIXES or _looks_dicom(path) or sfx == "":
            return read_dicom_file(path)
    except MedlensError:
        raise
    except MemoryError:
        raise DataError("image too large to load into memory", path) from None
    except Exception as e:  # a reader bug or a malformed file the reader did not anticipate
        raise DataError(f"could not read ({type(e).__name__}: {' '.join(str(e).split())[:200]})", path) from e
    raise DataError(f"unsupported file type '{sfx}'", path)
