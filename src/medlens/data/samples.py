"""``medlens data samples DIR``: a small folder of real example files, written from the shared data, that
every README command can name (``xray1.png``, ``ct_slice.dcm``, ``dicom_series/``, ``fundus1.jpg``,
``brain1.nii.gz`` + ``brain1_mask.nii.gz``...). Nothing is downloaded: the files come from
``$MEDLENS_DATA`` (PneumoniaMNIST, LIDC-IDRI-0001, CHASE_DB1, mri-seg), with their licences there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image as PILImage

from medlens.errors import DataError, MedlensError
from medlens.io import load, save
from medlens.utils import data_dir

SERIES_SLICES = 16   # consecutive slices of the LIDC series copied as dicom_series/ (a valid, short series)


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError("sample source missing from the shared data (set MEDLENS_DATA)", path)
    return path


def write_samples(out: str | Path, root: str | Path | None = None) -> dict[str, str]:
    """Write the sample files into the new or empty folder ``out``; return ``{file: what it is}``."""
    root = Path(root) if root is not None else data_dir()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedlensError("samples folder exists and is not empty; give a new or empty folder", out)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    # chest X-rays: the first normal and the first pneumonia image of PneumoniaMNIST's test split (28 px)
    with np.load(_need(root / "medmnist" / "pneumoniamnist.npz"), allow_pickle=False) as z:
        images, labels = z["test_images"], z["test_labels"].reshape(-1)
    for name, label in (("xray1.png", 0), ("xray2.png", 1)):
        i = int(np.flatnonzero(labels == label)[0])
        PILImage.fromarray(images[i]).save(out / name)
        made[name] = f"PneumoniaMNIST test image {i} ({'normal' if label == 0 else 'pneumonia'}), 28 px"
    # CT: one DICOM slice and a short series of LIDC-IDRI-0001 (slices around the LUNA16 nodule)
    files = sorted(_need(root / "lidc-idri-0001").rglob("*.dcm"))
    # slices in patient z order (file names do not follow it), so that a run of them is a gap-free series
    series = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    if len(series) < SERIES_SLICES:
        raise DataError("the LIDC-IDRI-0001 series is incomplete", root / "lidc-idri-0001")
    start = max(0, min(len(series) // 2 - SERIES_SLICES // 2, len(series) - SERIES_SLICES))
    shutil.copyfile(series[start], out / "ct_slice.dcm")
    made["ct_slice.dcm"] = "one CT slice of LIDC-IDRI-0001 (DICOM, HU)"
    (out / "dicom_series").mkdir()
    for f in series[start:start + SERIES_SLICES]:
        shutil.copyfile(f, out / "dicom_series" / f.name)
    made["dicom_series/"] = f"{SERIES_SLICES} consecutive CT slices of LIDC-IDRI-0001 (a DICOM series)"
    xml = sorted((root / "lidc-idri-0001").rglob("*.xml"))
    if xml:
        shutil.copyfile(xml[0], out / "lidc_0001.xml")
        made["lidc_0001.xml"] = "the LIDC reader annotations of LIDC-IDRI-0001"
    # fundus photographs (CHASE_DB1)
    for name, src in (("fundus1.jpg", "Image_01L.jpg"), ("fundus2.jpg", "Image_14R.jpg")):
        shutil.copyfile(_need(root / "chasedb1" / "CHASEDB1" / src), out / name)
        made[name] = f"CHASE_DB1 {src} (colour fundus photograph)"
    # MRI volumes with lesion masks as NIfTI (mri-seg brain1, brain2)
    for case in ("brain1", "brain2"):
        save(load(_need(root / "mri-seg" / f"{case}_image.nrrd")), out / f"{case}.nii.gz")
        save(load(_need(root / "mri-seg" / f"{case}_label.nrrd")), out / f"{case}_mask.nii.gz")
        made[f"{case}.nii.gz"] = f"mri-seg {case} MRI volume (NIfTI), with {case}_mask.nii.gz (lesion mask)"
    return made
