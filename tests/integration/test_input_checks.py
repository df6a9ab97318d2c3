"""Issue 19: the run stores its training inputs' profile; predict warns on inputs outside it (a CT slice
given to the chest X-ray model), and in-distribution inputs pass quietly. Also: a patch-store run predicts
an ``.npy`` HU patch through the store's own lung window (no train/serve skew)."""

import warnings

import numpy as np
import pytest
from PIL import Image as PILImage

from medlens.errors import MedlensWarning
from medlens.run import Predictor, Run


def test_ct_slice_given_to_the_xray_model_warns(trained_run, data_root, tmp_path):
    run = Run.open(trained_run)
    prof = run.meta.input_profile
    assert prof is not None and prof.modality == "DX" and prof.source_rgb is False and prof.size_min == [28, 28]
    ct = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[60]
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        test = z["test_images"]
    xray = tmp_path / "xray.png"
    PILImage.fromarray(test[5]).save(xray)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = Predictor(run).predict_files([str(ct), str(xray)])
    reasons = rows[0].extra["input_warnings"]
    assert any("modality CT" in r for r in reasons) and any(r.startswith("size 512x512") for r in reasons)
    # (its min-max scaled intensities are not told apart from X-ray ones: the histogram check does not fire)
    assert rows[1].extra["input_warnings"] == [] and "input_warnings" in rows[0].as_dict()
    shown = [str(w.message) for w in caught if issubclass(w.category, MedlensWarning)]
    assert len(shown) == 1 and str(ct) in shown[0] and "caution" in shown[0]
    # the limit lets the real test split through: few in-distribution images are flagged
    from medlens.run.profile import check_input

    p = Predictor(run)
    flagged = sum(bool(check_input(prof, p.prepare(im), None, False, im.shape)) for im in test[:300])
    assert flagged <= 6  # at most 2% of 300 test images (the limit is the training 99.5th percentile + 0.05)


def test_colour_photo_given_to_the_gray_model_warns(trained_run, data_root):
    run = Run.open(trained_run)
    fundus = data_root / "chasedb1" / "CHASEDB1" / "Image_01L.jpg"
    with pytest.warns(MedlensWarning, match="colour image"):
        row = Predictor(run).predict_files([str(fundus)])[0]
    assert any("histogram distance" in r for r in row.extra["input_warnings"])


def test_patch_store_run_predicts_npy_hu_patches_through_its_lung_window(tmp_path, data_root):
    from medlens.config import config_from_dict
    from medlens.data.nodules import PatchStoreDataset
    from medlens.workflow.nodules import extract_patches
    from medlens.workflow.train import train

    store = tmp_path / "s.h5"
    extract_patches(data_root / "luna16", data_root / "luna16" / "annotations.csv", store, neg_ratio=5, seed=0)
    cfg = config_from_dict({"name": "p", "output_dir": str(tmp_path), "data": {"source": "hdf5", "path": str(store),
                            "normalize": "none", "val_fraction": 0.3, "test_fraction": 0.3},
                            "model": {"name": "luna16_nodule_cnn"}, "evaluation": {"bootstrap": 0},
                            "train": {"epochs": 1, "precision": "32", "batch_size": 8}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = Run.open(train(cfg, progress_bar=False))
    assert run.meta.preprocessing.window == "lung"
    ds = PatchStoreDataset(store)
    hu = ds.read_hu([0])[0, 0]
    np.save(tmp_path / "patch.npy", hu)
    x_train, _ = ds.batch([0])
    np.testing.assert_array_equal(Predictor(run).prepare(str(tmp_path / "patch.npy")), x_train[0].numpy())
