"""The DICOM instances an input was read from: what DICOM SR, SEG and FHIR outputs reference.

A file gives its one dataset; a series folder gives its slices ordered like the volume's z axis (matched by
geometry in ``io.dicom_seg.source_slices``, never by file name). No pixel data is read. Used by ``predict``,
``segment``, ``nodules`` and ``detect`` (``workflow/``) and by ``serve`` for uploads asked as ``dicom-sr``/``fhir``.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from medlens.errors import DataError
from medlens.io.dicom_seg import source_slices
from medlens.io.image import Image


def dicom_sources(path: str | Path, image: Image | None = None) -> list:
    """The DICOM instances an input was read from (no pixel data), ordered like its z axis for a series."""
    path = Path(path)
    if path.is_dir():
        if image is None or "series_uid" not in image.meta:
            raise DataError("not a DICOM series folder", path)
        return source_slices(path, image)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM: the caller decides
        raise DataError("not a DICOM file (SR/SEG/FHIR outputs need DICOM input)", path) from None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        raise DataError("DICOM file without SOP/study instance UIDs", path)
    return [ds]


def is_dicom_input(path: str | Path, image: Image | None) -> bool:
    """Whether ``image`` (read from ``path``) came from DICOM: a series folder, or one DICOM file."""
    p = Path(path)
    if p.is_dir():
        return image is not None and "series_uid" in image.meta
    return image is not None and "SOPClassUID" in image.meta
