"""DICOM reading on real data: the LIDC-IDRI-0001 series, pydicom's and pydicom-data's test files."""

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medlens.errors import DataError, MedlensError, MedlensWarning
from medlens.io import load
from medlens.io.dicom import list_series, read_dicom_series

NODULE_WORLD = (56.20840547, 86.34341278, -115.8675792)


def dicom_test_files() -> list[Path]:
    import data_store

    pyd = Path(pydicom.__file__).parent / "data" / "test_files"
    ext = Path(data_store.__file__).parent / "data"
    return sorted(pyd.glob("*.dcm")) + sorted(ext.glob("*.dcm"))


@pytest.fixture(scope="module")
def lidc(data_root):
    return read_dicom_series(data_root / "lidc-idri-0001")


@pytest.fixture(scope="module")
def luna(data_root):
    return load(next((data_root / "luna16").glob("*.mhd")))


def test_lidc_series_matches_luna16_mhd(lidc, luna):
    assert lidc.array.shape == (133, 512, 512) and lidc.modality == "CT"
    assert lidc.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    assert np.array_equal(lidc.array, luna.array)  # voxel for voxel, in HU
    assert lidc.origin == pytest.approx(luna.origin, abs=1e-4)
    assert lidc.array.min() >= -2048 and (lidc.array < -900).mean() > 0.2  # air in HU, not raw values


def test_luna16_annotation_maps_to_the_nodule_voxel(lidc, luna, data_root):
    row = pd.read_csv(data_root / "luna16" / "annotations.csv").iloc[0]
    world = (row.coordX, row.coordY, row.coordZ)
    for img in (lidc, luna):
        z, y, x = img.world_to_voxel(world)
        assert round(x) == 316 and round(y) == 367 and z == pytest.approx(89.7, abs=0.1)
        assert np.allclose(img.voxel_to_world((z, y, x)), world)


def test_shuffled_and_renamed_series_loads_identically(lidc, data_root, tmp_path):
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))
    rng = random.Random(0)
    names = [f"{rng.getrandbits(40):x}" for _ in files]
    rng.shuffle(files)
    for i, (f, n) in enumerate(zip(files, names)):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        shutil.copy(f, sub / f"{n}.dcm")
    again = read_dicom_series(tmp_path)
    assert np.array_equal(again.array, lidc.array) and again.origin == lidc.origin


def test_missing_slice_is_refused_naming_the_gap(data_root, tmp_path):
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    positions = {f.name: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files}
    order = sorted(positions, key=positions.get)
    removed = order[60]
    (tmp_path / removed).unlink()
    with pytest.raises(DataError) as e:
        read_dicom_series(tmp_path)
    msg = str(e.value)
    assert "1 missing slice(s)" in msg and order[59] in msg and order[61] in msg and "gap 5.00 mm" in msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img = read_dicom_series(tmp_path, on_gap="warn")
    assert img.array.shape[0] == 132 and any("missing slice" in str(x.message) for x in w)


def test_two_series_need_a_choice(data_root, tmp_path):
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    for f in files[10:15]:  # five adjacent slices
        shutil.copy(f, tmp_path / f.name)
    ct_small = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    shutil.copy(ct_small, tmp_path / "other.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(DataError, match="holds 2 series; choose one with --series"):
        read_dicom_series(tmp_path)
    series = list_series(tmp_path)
    img = read_dicom_series(tmp_path, series_uid=series[0].short_id)
    assert img.array.shape == (5, 512, 512)


def test_every_pydicom_test_file_loads_or_fails_clearly():
    loaded, refused, crashed = [], [], []
    for f in dicom_test_files():
        try:
            img = load(f)
            # load() refuses NaN/inf (an error naming the file), so what it returns must be all finite
            assert img.array.size > 0 and np.isfinite(img.array).all(), f.name
            assert all(np.isfinite(img.spacing)) and min(img.spacing) > 0, f.name
            loaded.append(f.name)
        except MedlensError as e:
            assert f.name in str(e) and "\n" not in str(e)
            refused.append(f"{f.name}: {str(e).split(': ', 1)[1][:80]}")
        except Exception as e:  # anything else is a bug
            crashed.append(f"{f.name}: {type(e).__name__}: {e}")
    print(f"\nloaded {len(loaded)}: {', '.join(loaded)}\nrefused {len(refused)}:\n  " + "\n  ".join(refused))
    assert not crashed, crashed
    assert len(loaded) >= 100 and len(loaded) + len(refused) == len(dicom_test_files())


def _test_file(name):
    return next(f for f in dicom_test_files() if f.name == name)


def test_compressed_transfer_syntaxes_decode_to_the_same_pixels():
    ref = load(_test_file("MR_small.dcm")).array
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(load(_test_file(name)).array, ref), name


def test_ct_hounsfield_and_multiframe_and_rgb():
    ct = load(_test_file("CT_small.dcm"))
    ds = pydicom.dcmread(_test_file("CT_small.dcm"))
    assert np.array_equal(ct.array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    mf = load(_test_file("emri_small.dcm"))  # multi-frame MR
    assert mf.array.ndim == 3 and mf.array.shape[0] == 10
    rgb = load(_test_file("SC_rgb.dcm"))
    assert rgb.is_rgb and rgb.array.shape[-1] == 3


def _with_modality_lut(ds, lut: np.ndarray, first: int):
    """A CT slice whose stored values map to HU through a Modality LUT Sequence instead of slope/intercept."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "SS", [len(lut), first, 16])  # LUTDescriptor: entries, first stored value, bits
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    ds.ModalityLUTSequence = [item]
    for k in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if k in ds:
            delattr(ds, k)
    return ds


def test_modality_lut_sequence_gives_the_values(data_root, tmp_path):
    first, lut = -1024, ((np.arange(4096) ** 2) // 1000).astype(np.uint16)  # non-linear: no slope/intercept fits
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[40:43]
    series = tmp_path / "series"
    series.mkdir()
    expected = []
    for f in files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.astype(np.int64)
        expected.append(lut[np.clip(stored - first, 0, len(lut) - 1)])  # PS3.3 C.11.1: clamp, then look up
        _with_modality_lut(ds, lut, first).save_as(series / f.name)
    one = load(series / files[0].name)
    assert np.array_equal(one.array, expected[0]) and expected[0].max() > 1000
    assert np.array_equal(load(series).array, np.stack(expected))
    # pydicom's own test file with a Modality LUT Sequence (and no rescale): looked up by hand here
    real = _test_file("mlut_18.dcm")
    ds = pydicom.dcmread(real)
    n, first, _ = (int(v) for v in ds.ModalityLUTSequence[0].LUTDescriptor)
    table = np.asarray(ds.ModalityLUTSequence[0].LUTData)
    stored = ds.pixel_array.astype(np.int64)
    assert np.array_equal(load(real).array, table[np.clip(stored - first, 0, n - 1)])
    assert not np.array_equal(load(real).array, stored)


def test_monochrome1_is_inverted():
    for f in dicom_test_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1" and int(ds.get("NumberOfFrames") or 1) == 1:
            raw = pydicom.dcmread(f).pixel_array
            img = load(f)
            assert img.meta.get("inverted_monochrome1")
            corr = np.corrcoef(raw.ravel().astype(float), np.asarray(img.array, float).ravel())[0, 1]
            assert corr < -0.99, f.name
            return
    pytest.fail("no MONOCHROME1 file among the test files")


def test_enhanced_multiframe_geometry():
    found = 0
    for f in dicom_test_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if "PerFrameFunctionalGroupsSequence" in ds and int(ds.get("NumberOfFrames") or 1) > 1 \
                and int(ds.get("SamplesPerPixel") or 1) == 1:
            try:
                img = load(f)
            except DataError:
                continue
            assert img.spatial_dims == 3 and min(img.spacing) > 0
            found += 1
    assert found >= 1


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: p.write_text("this is a text file, not DICOM\n" * 20), "not a DICOM file"),
    (lambda p: p.write_bytes(_test_file("CT_small.dcm").read_bytes()[:20000]), "truncated or corrupt"),
    (lambda p: shutil.copy(_test_file("test-SR.dcm"), p), "no pixel data"),
])
def test_bad_dicom_files(tmp_path, make, needle):
    p = tmp_path / "bad.dcm"
    make(p)
    with pytest.raises(DataError) as e:
        load(p)
    assert needle in str(e.value) and "bad.dcm" in str(e.value)


def test_nan_nifti_is_refused(tmp_path):
    import nibabel as nib

    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), np.nan, np.float32), np.eye(4)), p)
    with pytest.raises(DataError, match=r"nan.nii.gz: every value \(120\) is NaN"):
        load(p)
    with pytest.raises(DataError, match="every value"):  # nothing finite: refused even when allowed
        load(p, allow_nonfinite=True)
    some = np.ones((4, 5, 6), np.float32)
    some[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(some, np.eye(4)), p)
    with pytest.raises(DataError, match="1 of 120 values are NaN or infinite"):
        load(p)
    with pytest.warns(MedlensWarning, match="nan.nii.gz: 1 of 120 values"):
        img = load(p, allow_nonfinite=True)
    assert np.isnan(img.array).sum() == 1 and np.nansum(img.array) == 119
