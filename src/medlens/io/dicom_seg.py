"""DICOM SEG output (highdicom): a label map over a DICOM series, referencing its source slices.

A DICOM SEG must carry the patient and study modules of its source images to attach to their study,
so it holds whatever identifying attributes the source holds; medlens writes one only when asked
(``medlens segment ... --dicom-seg`` or ``--outputs seg``), and ``--deidentify`` de-identifies the source
attributes first. Slices are matched to the volume's z axis by their ``ImagePositionPatient`` through the
series geometry, never by file name or order, so empty slices (which highdicom leaves out of the SEG)
cannot shift the frames.

Each segment carries clinically specific codes (segmented property category and type, and optionally an
anatomic region), from the run's config (``segmentation.dicom_codes``) or from the caller (lung nodules).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.content import AlgorithmIdentificationSequence
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription, Segmentation, SegmentationTypeValues
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes as dcodes

from medlens import __version__
from medlens.errors import DataError, MedlensWarning, ShapeError
from medlens.io.dicom import scan_series
from medlens.io.image import Image
from medlens.utils import atomic_path

# type-2 attributes highdicom copies from the source; absent ones are set empty on the in-memory copies
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")

Code3 = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)


@dataclass(frozen=True)
class SegmentCodes:
    """Segmented property category and type (CID 7150 / 7151 style) and an optional anatomic region."""

    category: Code3
    type: Code3
    region: Code3 | None = None

    def coded(self):
        c = lambda t: CodedConcept(value=t[0], scheme_designator=t[1], meaning=t[2])  # noqa: E731
        return c(self.category), c(self.type), (c(self.region) if self.region else None)


#: a lung nodule: Morphologically abnormal structure / Nodule, in the Lung (SNOMED CT)
LUNG_NODULE = SegmentCodes(("49755003", "SCT", "Morphologically Abnormal Structure"), ("27925004", "SCT", "Nodule"),
                           ("39607008", "SCT", "Lung"))
#: what a segment gets when nothing more specific is configured (with a warning)
GENERIC = SegmentCodes(("85756007", "SCT", "Tissue"), ("85756007", "SCT", "Tissue"))


def codes_from_config(entries, n_segments: int) -> list[SegmentCodes]:
    """``segmentation.dicom_codes`` entries (one per foreground class) as :class:`SegmentCodes`; a generic
    code with a warning where the config gives none."""
    out = []
    for k in range(n_segments):
        e = entries[k] if entries and k < len(entries) else None
        if e is None:
            out.append(GENERIC)
            continue
        t = lambda c: (c.value, c.scheme, c.meaning)  # noqa: E731
        out.append(SegmentCodes(t(e.category), t(e.type), t(e.region) if e.region is not None else None))
    if any(c is GENERIC for c in out):
        warnings.warn("the run's config names no segmentation.dicom_codes for some classes; their DICOM SEG "
                      "segments are coded as generic 'Tissue'", MedlensWarning)
    return out


def source_slices(folder: str | Path, image: Image) -> list:
    """The series' datasets (no pixel data) ordered like ``image``'s z axis.

    Refuses a series whose slices do not share one frame of reference (positions in different patient
    coordinate systems cannot be one volume)."""
    uid = image.meta.get("series_uid")
    groups = scan_series(Path(folder), False)
    if not uid or uid not in groups:
        raise DataError("the DICOM series of this volume is not in the folder", folder)
    frames = {str(ds.get("FrameOfReferenceUID", "")) for _, ds in groups[uid][1]}
    if len(frames) > 1:
        raise DataError(f"the series mixes {len(frames)} frames of reference (FrameOfReferenceUID); its slices "
                        "are not one volume", folder)
    by_z: dict[int, object] = {}
    for path, ds in groups[uid][1]:
        if "ImagePositionPatient" not in ds:
            raise DataError("slice without ImagePositionPatient", path)
        z = image.world_to_voxel([float(v) for v in ds.ImagePositionPatient])[0]
        k = int(round(z))
        if abs(z - k) > 0.1 or not 0 <= k < image.shape[0] or k in by_z:
            raise DataError(f"slice does not sit on the volume's slice {k} (z index {z:.2f})", path)
        by_z[k] = ds
    if len(by_z) != image.shape[0]:
        raise DataError(f"{len(by_z)} slices for a volume of {image.shape[0]}", folder)
    return [by_z[k] for k in range(image.shape[0])]


def prepare_sources(sources: list) -> list:
    """Type-2 attributes highdicom copies, set empty where the source lacks them (in place)."""
    for ds in sources:
        for a in _TYPE2:
            if a not in ds:
                setattr(ds, a, "")
    return sources


def build_dicom_seg(labels: np.ndarray, sources: list, segment_labels: list[str], codes: list[SegmentCodes],
                    algorithm: str = "medlens U-Net", version: str | None = None,
                    tracking: list[tuple[str, str]] | None = None, series_number: int = 9001):
    """A binary DICOM SEG (highdicom ``Segmentation``) of the label map ``labels`` (z, y, x; 0 background,
    k = segment k) over ``sources`` (datasets ordered like z). ``tracking``: (id, UID) per segment."""
    version = version or __version__
    if labels.shape[0] != len(sources):
        raise ShapeError(f"label map has {labels.shape[0]} slices for {len(sources)} source images")
    prepare_sources(sources)
    algo = AlgorithmIdentificationSequence(name=algorithm[:64], version=version[:64],
                                           family=dcodes.cid7162.ArtificialIntelligence)
    descs = []
    for k, (label, c) in enumerate(zip(segment_labels, codes), start=1):
        cat, typ, region = c.coded()
        tid, tuid = tracking[k - 1] if tracking else (None, None)
        descs.append(SegmentDescription(segment_number=k, segment_label=str(label)[:64],
                                        segmented_property_category=cat, segmented_property_type=typ,
                                        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                                        algorithm_identification=algo, anatomic_regions=[region] if region else None,
                                        tracking_id=tid, tracking_uid=tuid))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Segmentation(source_images=sources, pixel_array=labels.astype(np.uint8),
                            segmentation_type=SegmentationTypeValues.BINARY, segment_descriptions=descs,
                            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
                            instance_number=1, manufacturer="medlens", manufacturer_model_name=algorithm[:64],
                            software_versions=version[:64], device_serial_number="none",
                            series_description=f"{algorithm} segmentation"[:64])


def write_dicom_seg(labels: np.ndarray, image: Image, folder: str | Path, path: str | Path,
                    class_names: list[str], algorithm: str = "medlens U-Net",
                    codes: list[SegmentCodes] | None = None, sources: list | None = None) -> Path:
    """Write class indices (z, y, x) over the DICOM series in ``folder`` as a binary DICOM SEG with one
    segment per foreground class (``class_names[1:]``), coded by ``codes`` (default: generic, warned)."""
    if labels.shape != image.shape:
        raise ShapeError(f"label map {labels.shape} does not match the series volume {image.shape}", path)
    sources = sources if sources is not None else source_slices(folder, image)
    names = [str(n) for n in class_names[1:]]
    codes = codes or codes_from_config(None, len(names))
    seg = build_dicom_seg(labels, sources, names, codes, algorithm)
    return save_dataset(seg, path)


def save_dataset(ds, path: str | Path) -> Path:
    """Write a pydicom dataset atomically (a whole file or none)."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)
