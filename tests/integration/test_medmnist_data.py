"""MedMNIST on the real files in $MEDLENS_DATA/medmnist."""

import shutil

import numpy as np
import pytest

from medlens.data.catalog import MEDMNIST
from medlens.data.medmnist import load_medmnist, read_npz, verify
from medlens.errors import DataError


def test_catalogue_has_all_18_datasets_and_task_types():
    assert len(MEDMNIST) == 18
    assert sum(i.dims == 3 for i in MEDMNIST.values()) == 6
    assert MEDMNIST["retinamnist"].task == "ordinal" and MEDMNIST["chestmnist"].task == "multilabel"
    assert MEDMNIST["pneumoniamnist"].task == "binary" and MEDMNIST["pathmnist"].task == "multiclass"
    assert all(len(i.md5) == len(i.sizes) for i in MEDMNIST.values())


@pytest.mark.parametrize("name,size,shape,counts", [
    ("pneumoniamnist", 28, (1, 28, 28), (4708, 524, 624)),
    ("retinamnist", 28, (3, 28, 28), (1080, 120, 400)),
    ("adrenalmnist3d", 28, (1, 28, 28, 28), (1188, 98, 298)),
    ("adrenalmnist3d", 64, (1, 64, 64, 64), (1188, 98, 298)),
])
def test_official_splits_and_shapes(data_root, name, size, shape, counts):
    data = load_medmnist(name, size)
    assert tuple(len(data.get(s)) for s in ("train", "val", "test")) == counts
    assert data.train.images.shape[1:] == shape
    info = MEDMNIST[name]
    assert data.train.labels.max() == info.n_classes - 1 and data.train.task == info.task


def test_md5_checked_against_official_value(data_root, tmp_path):
    assert verify("pneumoniamnist", 28).name == "pneumoniamnist.npz"
    bad = tmp_path / "pneumoniamnist.npz"
    shutil.copy(data_root / "medmnist" / "retinamnist.npz", bad)  # right name, wrong content
    with pytest.raises(DataError, match="does not match the official"):
        verify("pneumoniamnist", 28, root=tmp_path)


def test_missing_file_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="medlens data fetch pneumoniamnist --size 64"):
        load_medmnist("pneumoniamnist", 64, root=tmp_path)


def test_corrupt_npz(data_root, tmp_path):
    p = tmp_path / "cut.npz"
    p.write_bytes((data_root / "medmnist" / "pneumoniamnist.npz").read_bytes()[:100_000])
    with pytest.raises(DataError, match="cut.npz: not a readable .npz"):
        read_npz(p)


def test_npz_with_wrong_keys(tmp_path):
    p = tmp_path / "wrong.npz"
    np.savez(p, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros((2, 1)))
    with pytest.raises(DataError, match="lacks the keys"):
        load_medmnist("pneumoniamnist", path=p)


def test_wrong_image_shape(tmp_path):
    p = tmp_path / "shape.npz"
    arrays = {f"{s}_images": np.zeros((3, 28, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.zeros((3, 1), np.uint8) for s in ("train", "val", "test")})
    np.savez(p, **arrays)
    with pytest.raises(DataError, match="do not fit pneumoniamnist"):
        load_medmnist("pneumoniamnist", path=p)


def test_unknown_dataset_and_size():
    with pytest.raises(DataError, match="did you mean 'pneumoniamnist'"):
        load_medmnist("pneumoniamnst")
    with pytest.raises(DataError, match="not 128"):
        load_medmnist("adrenalmnist3d", 128)


def test_medlens_data_in_the_config_resolves_when_loading_and_stays_portable(data_root):
    """``data.path: $MEDLENS_DATA/...`` is kept as written in the config (and its saved copy) and
    expanded by the loader: the same file as the catalogue location, official split and all."""
    from medlens.config import config_from_dict, dump_config
    from medlens.data import build_data

    cfg = config_from_dict({"name": "p", "data": {"name": "pneumoniamnist", "check_md5": False,
                                                  "path": "${MEDLENS_DATA}/medmnist/pneumoniamnist.npz"}})
    assert cfg.data.path == "${MEDLENS_DATA}/medmnist/pneumoniamnist.npz"
    assert str(data_root) not in dump_config(cfg)
    data = build_data(cfg.data)
    ref = load_medmnist("pneumoniamnist")
    assert tuple(len(data.get(s)) for s in ("train", "val", "test")) == (4708, 524, 624)
    assert np.array_equal(data.test.images, ref.test.images) and np.array_equal(data.test.labels, ref.test.labels)
    assert data.train.meta["file"] == str(data_root / "medmnist" / "pneumoniamnist.npz")
