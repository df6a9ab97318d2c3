"""Formats, geometry, intensity, writers and views on real volumes."""

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from medlens.errors import ConfigError, DataError
from medlens.io import load, orientation_code, reorient, resample, save
from medlens.io.image import Image
from medlens.io.dicom import read_dicom_series
from medlens.io.views import write_views
from medlens.io.windows import WINDOWS, apply_window
from medlens.transforms.intensity import clahe, normalize
from medlens.transforms.preprocess import green_channel


@pytest.fixture(scope="module")
def brain(data_root):
    return load(data_root / "mri-seg" / "brain1_image.nrrd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mhd", ".nrrd"])
def test_round_trip_keeps_voxels_and_geometry(brain, tmp_path, suffix):
    out = save(brain, tmp_path / f"b{suffix}")
    back = load(out)
    assert np.array_equal(back.array, brain.array)
    assert back.spacing == pytest.approx(brain.spacing) and back.origin == pytest.approx(brain.origin, abs=1e-4)
    assert np.allclose(back.direction, brain.direction, atol=1e-6)
    assert not list(tmp_path.glob(".medlens-*"))  # no temporary left behind


def test_world_voxel_agrees_with_simpleitk(brain, data_root):
    ref = sitk.ReadImage(str(data_root / "mri-seg" / "brain1_image.nrrd"))
    assert orientation_code(brain) != "LPS"  # a non-trivial direction matrix
    for ijk in [(0, 0, 0), (10.5, 200.25, 7.0), (255, 255, 24)]:
        world = ref.TransformContinuousIndexToPhysicalPoint(ijk)
        assert np.allclose(brain.voxel_to_world(ijk[::-1]), world, atol=1e-6)
        assert np.allclose(brain.world_to_voxel(world), ijk[::-1], atol=1e-6)


def test_resample_and_reorient(brain):
    iso = resample(brain, (1.0, 1.0, 1.0))
    assert iso.spacing == pytest.approx((1.0, 1.0, 1.0))
    extent = np.array(brain.shape) * np.array(brain.spacing)
    assert np.allclose(np.array(iso.shape) * 1.0, extent, atol=1.0)
    lps = reorient(brain, "LPS")
    assert orientation_code(lps) == "LPS" and sorted(lps.shape) == sorted(brain.shape)
    # the same physical point holds the same value before and after reorientation
    idx = np.array([12, 100, 140])
    w = brain.voxel_to_world(idx)
    j = np.round(lps.world_to_voxel(w)).astype(int)
    assert lps.array[tuple(j)] == brain.array[tuple(idx)]


def test_dicom_series_writer_round_trip(data_root, tmp_path):
    ct = read_dicom_series(data_root / "lidc-idri-0001")
    sub = ct.with_array(ct.array[40:50], origin=tuple(ct.voxel_to_world([40, 0, 0])))
    files = save(sub, tmp_path / "series")
    assert len(files) == 10
    back = read_dicom_series(tmp_path / "series")
    assert np.array_equal(back.array, sub.array) and back.origin == pytest.approx(sub.origin, abs=1e-5)
    assert back.spacing == pytest.approx(sub.spacing) and back.modality == "CT"


def test_windows_and_normalisation():
    hu = np.array([-1350.0, -600.0, 150.0, 1000.0])
    assert apply_window(hu, "lung").tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert apply_window(hu, "40,400").tolist() == pytest.approx([0, 0, (150 + 160) / 400, 1])
    assert set(WINDOWS) >= {"lung", "mediastinum", "bone", "brain", "abdomen"}
    with pytest.raises(ConfigError, match="unknown window"):
        apply_window(hu, "lungs")
    z = normalize(np.arange(10.0))
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, abs=1e-5)


def test_fundus_green_channel_and_clahe(data_root):
    img = load(data_root / "chasedb1" / "CHASEDB1" / "Image_01L.jpg")
    assert img.is_rgb and img.array.shape == (960, 999, 3)
    g = green_channel(img.array)
    assert np.array_equal(g, img.array[..., 1])
    eq = clahe(g)
    fov = g > 20
    from scipy import ndimage

    def edges(a):  # mean gradient magnitude: local contrast (vessel edges)
        a = a.astype(float)
        return np.hypot(ndimage.sobel(a, 0), ndimage.sobel(a, 1))[fov].mean()

    assert edges(eq) > 1.5 * edges(g)
    assert clahe(img.array).shape == img.array.shape


def test_16bit_png_keeps_depth(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    PILImage.fromarray(a).save(tmp_path / "a.png")
    back = load(tmp_path / "a.png")
    assert back.array.dtype == np.uint16 and np.array_equal(back.array, a)


def test_views_are_written_with_true_aspect(data_root, tmp_path):
    ct = load(next((data_root / "luna16").glob("*.mhd")))
    paths = write_views(ct, tmp_path, "lung", center_zyx=(90, 367, 316))
    sizes = {p.stem: PILImage.open(p).size for p in paths}
    assert sizes["axial"] == (512, 512)
    assert sizes["coronal"] == (512, round(133 * 2.5 / 0.703125))  # 473 rows: mm-true height
    axial = np.asarray(PILImage.open(tmp_path / "axial.png"))
    assert axial[367, 316] > 150 and axial[100, 256] < axial[367, 316]  # the nodule is bright in a lung window


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load(tmp_path / "x.xyz")
    with pytest.raises(DataError, match="file not found"):
        load(tmp_path / "nope.nii.gz")
    with pytest.raises(DataError, match="unsupported output format"):
        save(Image(np.zeros((4, 4))), tmp_path / "o.xyz")
