"""DICOM SEG output (highdicom): a label map over a DICOM series, referencing its source slices.

A DICOM SEG must carry the patient and study modules of its source images to attach to their study,
so it holds whatever identifying attributes the source holds; medlens writes one only when asked
(``medlens segment ... --dicom-seg``). Slices are matched to the volume's z axis by their
``ImagePositionPatient`` through the series geometry, never by file name or order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.errors import DataError, ShapeError
from medlens.io.image import Image
from medlens.utils import atomic_path

# type-2 attributes highdicom copies from the source; absent ones are set empty on the in-memory copies
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_slices(folder: str | Path, image: Image) -> list:
    """The series' datasets (no pixel data) ordered like ``image``'s z axis."""
    from medlens.io.dicom import _scan

    uid = image.meta.get("series_uid")
    groups = _scan(Path(folder), False)
    if not uid or uid not in groups:
        raise DataError("the DICOM series of this volume is not in the folder", folder)
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


def write_dicom_seg(labels: np.ndarray, image: Image, folder: str | Path, path: str | Path,
                    class_names: list[str], algorithm: str = "medlens U-Net") -> Path:
    """Write class indices (z, y, x) over the DICOM series in ``folder`` as a binary DICOM SEG with one
    segment per foreground class (``class_names[1:]``)."""
    import highdicom as hd
    from highdicom.content import AlgorithmIdentificationSequence
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription, Segmentation
    from pydicom.sr.codedict import codes

    from medlens import __version__

    if labels.shape != image.shape:
        raise ShapeError(f"label map {labels.shape} does not match the series volume {image.shape}", path)
    sources = source_slices(folder, image)
    for ds in sources:
        for a in _TYPE2:
            if a not in ds:
                setattr(ds, a, "")
    algo = AlgorithmIdentificationSequence(name=algorithm, version=__version__,
                                           family=codes.cid7162.ArtificialIntelligence)
    descs = [SegmentDescription(segment_number=k, segment_label=str(class_names[k])[:64],
                                segmented_property_category=codes.SCT.Tissue,
                                segmented_property_type=codes.SCT.Tissue,
                                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
             for k in range(1, len(class_names))]
    seg = Segmentation(source_images=sources, pixel_array=labels.astype(np.uint8),
                       segmentation_type=SegmentationTypeValues.BINARY, segment_descriptions=descs,
                       series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(),
                       instance_number=1, manufacturer="medlens", manufacturer_model_name=algorithm,
                       software_versions=__version__, device_serial_number="none",
                       series_description=f"{algorithm} segmentation"[:64])
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
