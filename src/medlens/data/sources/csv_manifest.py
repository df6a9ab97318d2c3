"""``data.source: csv``: a CSV manifest of image paths with labels and patient ids (classification), or image
and mask paths (segmentation), confined to ``data.image_root``."""

from __future__ import annotations

from medlens.data.folder import dicom_patients, load_csv_manifest
from medlens.data.segmentation import patient_of, read_manifest
from medlens.data.sources.registry import DataSource, register_source


@register_source
class CSVSource(DataSource):
    name = "csv"
    summary = ("CSV manifest: image path, label (or several 0/1 label columns, or a numeric target), patient id "
               "(or image and mask paths)")
    reads_files = True
    pairs = True
    subgroups = True
    label_columns = True
    plan_suffixes = (".csv",)

    def load(self, cfg, *, seed, prepare, progress):
        return load_csv_manifest(cfg.resolved_path(), prepare, image_root=cfg.resolved_image_root(),
                                 path_column=cfg.path_column, label_column=cfg.label_column,
                                 label_columns=cfg.label_columns, target_column=cfg.target_column,
                                 patient_column=cfg.patient_column, suffix=cfg.suffix, val=cfg.val_fraction,
                                 test=cfg.test_fraction, seed=seed, progress=progress,
                                 allow_outside_root=cfg.allow_outside_root, patient_pattern=cfg.patient_pattern)

    def pair_rows(self, cfg) -> list:
        rows = read_manifest(cfg.resolved_path(), cfg.path_column, cfg.mask_column, cfg.patient_column,
                             cfg.reference_column, cfg.resolved_image_root(), cfg.allow_outside_root)
        # the patient: the manifest's column, else data.patient_pattern over the image's name, else the DICOM
        # PatientID; None when none tells (``load_segmentation`` then splits per image and says so)
        if rows and rows[0][3] is None:
            if cfg.patient_pattern:
                return [(i, m, r, patient_of(i.name, cfg.patient_pattern)) for i, m, r, _ in rows]
            ids = dicom_patients([i for i, *_ in rows])
            return [(i, m, r, None if ids is None else str(ids[k])) for k, (i, m, r, _) in enumerate(rows)]
        return rows
