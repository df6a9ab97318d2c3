"""``data.source: hdf5``: a CT patch store written by ``medlens nodules extract`` (patches stay on disk, in
Hounsfield units; classes non-nodule/nodule), split by patient."""

from __future__ import annotations

from medlens.data.nodules import PatchStoreDataset, load_patch_store
from medlens.data.sources.registry import DataSource, register_source


@register_source
class PatchStoreSource(DataSource):
    name = "hdf5"
    summary = "HDF5 CT patch store from `medlens nodules extract`, split by patient"
    holds_out_patient = True
    plan_suffixes = (".h5", ".hdf5")

    def check(self, cfg, task) -> None:
        if cfg.label_map:
            raise ValueError("data.label_map: a patch store has the fixed classes non-nodule/nodule "
                             "(data.positive_class may still choose)")

    def load(self, cfg, *, seed, prepare, progress):
        return load_patch_store(cfg.resolved_path(), val=cfg.val_fraction, test=cfg.test_fraction, seed=seed,
                                test_patient=cfg.test_patient)

    def profile_hints(self, train, cfg):
        return "CT", False  # CT patches in Hounsfield units

    def training_patients(self, cfg) -> set[str]:
        ds = PatchStoreDataset(cfg.path)
        return {p for p in set(ds.patient_ids.tolist()) if p != cfg.test_patient}
