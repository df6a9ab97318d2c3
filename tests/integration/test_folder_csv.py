"""Image-folder and CSV-manifest datasets on real image files (PNG exports of real X-rays, CHASE_DB1 JPEGs)."""

import numpy as np
import pytest
from PIL import Image

from medlens.data.folder import load_csv_manifest, load_image_folder
from medlens.data.medmnist import load_medmnist
from medlens.errors import DataError


@pytest.fixture(scope="module")
def xray_folder(tmp_path_factory, data_root):
    """PneumoniaMNIST test X-rays written as PNG files in a Keras-style class-folder tree."""
    root = tmp_path_factory.mktemp("xray_folder")
    test = load_medmnist("pneumoniamnist").test
    for i in range(120):
        cls = test.class_names[test.labels[i]]
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(test.images[i, 0]).save(root / cls / f"img{i:03d}.png")
    return root, test


def test_image_folder(xray_folder):
    root, test = xray_folder
    data = load_image_folder(root, size=28, color="gray", seed=0)
    assert data.class_names == ["normal", "pneumonia"] and data.task == "binary"
    total = sum(len(data.get(s)) for s in ("train", "val", "test"))
    assert total == 120
    # pixel-exact round trip of one file through the folder loader
    src = [s for s in data.train.sources if s.endswith("img000.png")]
    if src:
        i = list(data.train.sources).index(src[0])
        assert np.array_equal(data.train.images[i, 0], test.images[0, 0])
    # stratified: both classes in every split
    for s in ("train", "val", "test"):
        assert set(np.unique(data.get(s).labels)) == {0, 1}


def test_image_folder_errors(tmp_path, xray_folder):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "a.png")
    with pytest.raises(DataError, match="class 'pneumonia' has no images"):
        load_image_folder(tmp_path)
    (tmp_path / "normal" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "pneumonia" / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable image"):
        load_image_folder(tmp_path)


def test_csv_manifest_patient_level_split(tmp_path, data_root):
    """CHASE_DB1 fundus photos: 14 children x 2 eyes; the split must keep both eyes together."""
    chase = data_root / "chasedb1" / "CHASEDB1"
    rows = []
    for f in sorted(chase.glob("Image_*.jpg")):
        child = f.stem.split("_")[1][:2]
        rows.append(f"{f.name},{'left' if f.stem.endswith('L') else 'right'},child{child}")
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    data = load_csv_manifest(tmp_path / "m.csv", size=64, color="green", image_root=chase, val=0.15, test=0.3,
                             seed=3)
    assert len(rows) == 28 and data.train.images.shape[1:] == (1, 64, 64)
    sets = [set(data.get(s).patient_ids) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 14


def test_csv_manifest_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match="lacks the column\\(s\\) \\['path'\\]"):
        load_csv_manifest(tmp_path / "m.csv")
    (tmp_path / "m2.csv").write_text("path,label\nmissing.png,0\na.png,1\n")
    with pytest.raises(DataError, match="missing, first"):
        load_csv_manifest(tmp_path / "m2.csv")
    with pytest.raises(DataError, match="manifest not found"):
        load_csv_manifest(tmp_path / "none.csv")
