"""What the gateway tests (tests/e2e/test_gateway*.py, tests/integration/test_gateway_*.py) and
benchmarks/gateway.py share: a real PneumoniaMNIST image as a one-image DX study, the audit trail's UID hash
computed here independently of ``medlens.gateway.audit``, and polling for what a gateway process does."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def xray_file(folder: Path, pixels: np.ndarray, patient: tuple[str, str], modality: str = "DX",
              accession: str = "A1") -> tuple[Path, str, str, str]:
    """A one-image chest X-ray study (CHEST) of ``patient`` (name, ID; each test module hunts for its own in every
    output) from a real PneumoniaMNIST image, written in ``folder``: (file, study, series, SOP Instance UID)."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop}.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = DX_STORAGE, sop, study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = *patient, "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", accession, ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = modality, "CHEST", "test"
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path, study, series, sop


def uid_hash(site_key: str, uid: str) -> str:
    """The audit trail's name of a UID (HMAC-SHA256 under the site key, 32 hex characters), computed here."""
    return hmac.new(site_key.encode(), uid.encode(), hashlib.sha256).hexdigest()[:32]


def wait_for(what: str, fn, timeout: float = 60.0, every: float = 0.25):
    """``fn()``'s first truthy value, polled every ``every`` s; an AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
