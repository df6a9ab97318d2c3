"""Medical image I/O: ``load(path) -> Image`` for every supported format."""

from __future__ import annotations

from pathlib import Path

from medlens.errors import DataError
from medlens.io.image import Image
from medlens.io.raster import RASTER_SUFFIXES, read_npz_image, read_raster

__all__ = ["Image", "load"]


def load(path: str | Path, **kwargs) -> Image:
    """Load any supported medical image file (or DICOM folder) as an ``Image``."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return read_raster(path)
    if suffix in (".npz", ".npy"):
        return read_npz_image(path, **kwargs)
    raise DataError(f"unsupported file type '{suffix or path.name}'", path)
