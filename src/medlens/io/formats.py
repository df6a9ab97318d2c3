"""The one list of file suffixes medlens reads, by reader family. Everything else imports from here."""

from __future__ import annotations

from pathlib import Path

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
SITK_SUFFIXES = frozenset({".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".hdr", ".img"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
#: every single-file image suffix ``medlens.io.load`` reads
IMAGE_SUFFIXES = RASTER_SUFFIXES | ARRAY_SUFFIXES | SITK_SUFFIXES | DICOM_SUFFIXES


def suffix_of(path: str | Path) -> str:
    """Lower-case suffix, with the double suffix ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_image_file(path: str | Path) -> bool:
    return suffix_of(path) in IMAGE_SUFFIXES
