"""Image-folder and CSV-manifest datasets on real image files (PNG exports of real X-rays, CHASE_DB1 JPEGs)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.data.folder import load_csv_manifest, load_image_folder
from medlens.data.medmnist import load_medmnist
from medlens.errors import DataError


def _prep(size: int, color: str = "gray"):
    """The preparation medlens injects into the loaders (resize to ``size``, colour mode)."""
    from medlens.transforms.preprocess import InputSpec, Preparer

    return Preparer(InputSpec(2, (size, size), color))


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
    data = load_image_folder(root, _prep(28, "gray"), seed=0)
    assert data.class_names == ["normal", "pneumonia"] and data.task == "binary"
    total = sum(len(data.get(s)) for s in ("train", "val", "test"))
    assert total == 120
    # pixel-exact: every sample of every split against its file read independently (PIL), and against
    # the MedMNIST array it was written from; its label against its class folder
    checked = 0
    for s in ("train", "val", "test"):
        part = data.get(s)
        for i, src in enumerate(part.sources):
            reference = np.asarray(Image.open(src))
            assert part.images.dtype == np.uint8 and np.array_equal(part.images[i, 0], reference)
            k = int(Path(src).stem[3:])
            assert np.array_equal(reference, test.images[k, 0])
            assert data.class_names[part.labels[i]] == Path(src).parent.name == test.class_names[test.labels[k]]
            checked += 1
    assert checked == 120
    # stratified: both classes in every split
    for s in ("train", "val", "test"):
        assert set(np.unique(data.get(s).labels)) == {0, 1}


def test_image_folder_errors(tmp_path, xray_folder):
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path, _prep(224, "gray"))
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "a.png")
    with pytest.raises(DataError, match="class 'pneumonia' has no images"):
        load_image_folder(tmp_path, _prep(224, "gray"))
    (tmp_path / "normal" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "pneumonia" / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable image"):
        load_image_folder(tmp_path, _prep(224, "gray"))


def test_csv_manifest_patient_level_split(tmp_path, data_root):
    """CHASE_DB1 fundus photos: 14 children x 2 eyes; the split must keep both eyes together."""
    chase = data_root / "chasedb1" / "CHASEDB1"
    rows = []
    for f in sorted(chase.glob("Image_*.jpg")):
        child = f.stem.split("_")[1][:2]
        rows.append(f"{f.name},{'left' if f.stem.endswith('L') else 'right'},child{child}")
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    data = load_csv_manifest(tmp_path / "m.csv", _prep(64, "green"), image_root=chase, val=0.15, test=0.3, seed=3)
    assert len(rows) == 28 and data.train.images.shape[1:] == (1, 64, 64)
    sets = [set(data.get(s).patient_ids) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 14


def test_csv_manifest_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match="lacks the column\\(s\\) \\['path'\\]"):
        load_csv_manifest(tmp_path / "m.csv", _prep(224, "gray"))
    (tmp_path / "m2.csv").write_text("path,label\nmissing.png,0\na.png,1\n")
    with pytest.raises(DataError, match="missing, first"):
        load_csv_manifest(tmp_path / "m2.csv", _prep(224, "gray"))
    with pytest.raises(DataError, match="manifest not found"):
        load_csv_manifest(tmp_path / "none.csv", _prep(224, "gray"))


# --- one patient-level splitter for every source (issue 12) -----------------------------------------

def _synthetic_cohort(seed: int = 1):
    """300 patients with 1-5 images each; about 20 % of patients positive (all their images)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, 300)
    pids = np.repeat([f"pat{i:03d}" for i in range(300)], counts)
    labels = np.repeat((rng.random(300) < 0.2).astype(int), counts)
    return labels, pids


def test_patient_split_is_stratified_disjoint_and_deterministic():
    from medlens.data.splits import patient_split

    labels, pids = _synthetic_cohort()
    tr, va, te = patient_split(labels, pids, val=0.2, test=0.4, seed=7)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(pids)))  # a partition
    sets = [set(pids[s]) for s in (tr, va, te)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])  # no patient in two splits
    for part, want in ((tr, 0.4), (va, 0.2), (te, 0.4)):
        assert abs(len(part) / len(pids) - want) < 0.03  # the requested fractions
        assert abs(labels[part].mean() - labels.mean()) < 0.03  # the class mix of the whole cohort
    again = patient_split(labels, pids, val=0.2, test=0.4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = patient_split(labels, pids, val=0.2, test=0.4, seed=8)
    assert not np.array_equal(te, other[2])


def test_patient_split_handles_few_patients_and_refuses_too_few():
    from medlens.data.splits import patient_split

    tr, va, te = patient_split(None, ["a", "a", "b", "c"], val=0.34, test=0.34, seed=0)
    assert sorted(len(set(np.array(["a", "a", "b", "c"])[s])) for s in (tr, va, te)) == [1, 1, 1]
    with pytest.raises(DataError, match="at least 3 patients"):
        patient_split(None, ["a", "a", "b"], val=0.2, test=0.2, seed=0)


def _seg_folder(root, test_images, n: int = 20):
    """n single-case patients: real X-ray images (.npy) with PNG masks, half of them empty."""
    root.mkdir()
    for k in range(n):
        np.save(root / f"case{k:02d}.npy", test_images[k, 0])
        mask = np.zeros((28, 28), np.uint8)
        if k % 2:
            mask[8:20, 6:14] = 255
        Image.fromarray(mask).save(root / f"case{k:02d}_mask.png")
    return root


def test_segmentation_uses_the_one_splitter_stratified_by_foreground(tmp_path, data_root):
    from medlens.config import config_from_dict
    from medlens.data.segmentation import find_pairs
    from medlens.transforms.preprocess import prepared_segmentation
    from medlens.data.splits import patient_split

    test = load_medmnist("pneumoniamnist").test
    root = _seg_folder(tmp_path / "seg", test.images)
    assert len(find_pairs(root, "_mask.png")) == 20  # .npy images: the suffix list of medlens.io.formats
    for seed in range(4):
        cfg = config_from_dict({"name": "s", "seed": seed, "task": "segmentation",
                                "data": {"source": "folder", "path": str(root), "mask_suffix": "_mask.png",
                                         "val_fraction": 0.2, "test_fraction": 0.2}})
        data = prepared_segmentation(cfg.data, cfg.segmentation, seed=seed)
        ids = {s: sorted(c.case_id for c in data.get(s)) for s in ("train", "val", "test")}
        names = np.array([f"case{k:02d}" for k in range(20)])
        fg = np.arange(20) % 2
        expect = patient_split(fg, names, val=0.2, test=0.2, seed=seed)
        assert [ids[s] for s in ("train", "val", "test")] == [sorted(names[i]) for i in expect]
        for s, n in (("train", 12), ("val", 4), ("test", 4)):
            assert len(data.get(s)) == n and sum(int(c.mask.any()) for c in data.get(s)) == n // 2
        # no data.patient_pattern, patient column or DICOM: each case its own patient, said as a per-image split
        assert "stratified per-image split" in data.split_method and data.patients_known is False


def test_folder_takes_every_suffix_of_the_one_list(tmp_path, data_root):
    import SimpleITK as sitk

    test = load_medmnist("pneumoniamnist").test
    for k in range(12):
        cls = test.class_names[test.labels[k]]
        (tmp_path / cls).mkdir(exist_ok=True)
        if k % 3 == 0:
            sitk.WriteImage(sitk.GetImageFromArray(test.images[k, 0]), str(tmp_path / cls / f"img{k:03d}.nrrd"))
        else:
            Image.fromarray(test.images[k, 0]).save(tmp_path / cls / f"img{k:03d}.png")
    data = load_image_folder(tmp_path, _prep(28, "gray"), val=0, test=0.25, seed=0)
    seen = {Path(s).name: (d.images[i, 0]) for d in (data.train, data.test) for i, s in enumerate(d.sources)}
    assert len(seen) == 12 and sum(n.endswith(".nrrd") for n in seen) == 4
    for name, img in seen.items():
        assert np.array_equal(img, test.images[int(name[3:6]), 0])
