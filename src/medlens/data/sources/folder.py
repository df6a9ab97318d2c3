"""``data.source: folder``: a folder of image files, one sub-folder per class (classification), or image +
mask pairs named by ``data.mask_suffix`` (segmentation)."""

from __future__ import annotations

from medlens.data.folder import dicom_patients, load_image_folder
from medlens.data.segmentation import find_pairs, patient_of
from medlens.data.sources.registry import DataSource, register_source


@register_source
class FolderSource(DataSource):
    name = "folder"
    summary = "image files, one sub-folder per class; or image + mask pairs (data.mask_suffix)"
    reads_files = True
    pairs = True
    plan_folder = True

    def check(self, cfg, task) -> None:
        if task.dense and not cfg.mask_suffix:
            raise ValueError("data.mask_suffix is required for a segmentation folder (e.g. '_mask.png')")

    def load(self, cfg, *, seed, prepare, progress):
        return load_image_folder(cfg.resolved_path(), prepare, val=cfg.val_fraction, test=cfg.test_fraction,
                                 seed=seed, progress=progress, patient_pattern=cfg.patient_pattern)

    def pair_rows(self, cfg) -> list:
        """Pairs with their patient: ``data.patient_pattern`` over the image's name, else the DICOM PatientID;
        None when neither tells (``load_segmentation`` then splits per image and says so)."""
        triples = find_pairs(cfg.resolved_path(), cfg.mask_suffix, cfg.reference_suffix, cfg.image_suffix)
        if cfg.patient_pattern:
            return [(i, m, r, patient_of(i.name, cfg.patient_pattern, cfg.image_suffix)) for i, m, r in triples]
        ids = dicom_patients([i for i, _, _ in triples])
        return [(i, m, r, None if ids is None else str(ids[k])) for k, (i, m, r) in enumerate(triples)]
