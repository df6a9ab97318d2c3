"""The volume store (issue 27 item 3): CT/MR volumes prepared once into memory-mapped Blosc2 chunks that patch readers
slice. Tiny synthetic volumes written by the tests as real .mhd files; the store lives under the test process's
temporary ``$MEDLENS_CACHE`` (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from medlens.data.nodules import extract_patch_2d, extract_patch_3d
from medlens.data.volume_store import (
    StoredVolume,
    VolumeSpec,
    prepare_array,
    prepare_volume,
    volume_folder,
    write_volume,
)
from medlens.errors import DataError
from medlens.imaging.segment import lung_mask
from medlens.io import load, save
from medlens.io.image import Image


def _rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _phantom(tmp_path, name="ct.mhd", value=100):
    """A 'body' box of ``value`` HU in air, a 3-voxel bright marker inside it; an oblique grid."""
    arr = np.full((32, 48, 40), -1000, np.int16)
    arr[4:28, 6:40, 5:36] = value
    arr[15:18, 19:22, 19:22] = 1000
    img = Image(arr, spacing=(2.0, 0.8, 0.7), origin=(10.0, -20.0, 30.0), direction=_rotation_z(30), modality="CT")
    path = tmp_path / name
    save(img, path)
    return path, img


def test_round_trip_keeps_geometry_through_crop_resample_and_window(tmp_path):
    path, img = _phantom(tmp_path)
    spec = VolumeSpec(spacing=(1.0, 1.0, 1.0), crop_threshold=-500, normalize="window", window=(-1000.0, 1000.0))
    sv = prepare_volume(path, spec)  # prepared in the child process (data.volume_build)
    assert sv.path.parent == volume_folder(spec) and sv.path.suffix == ".b2nd"
    assert sv.offset == (4, 6, 5) and sv.source_shape == (32, 48, 40)
    assert sv.spacing == (1.0, 1.0, 1.0) and sv.source_spacing == (2.0, 0.8, 0.7)
    assert np.allclose(sv.direction, _rotation_z(30), atol=1e-9)
    assert np.allclose(sv.origin, img.voxel_to_world((4, 6, 5)))  # voxel 0 of the crop, in world mm
    # the cropped body (24 x 34 x 31 source voxels) at 1 mm
    assert sv.shape == (48, 27, 22)
    # the marker is where the source put it in the world, and the window scaled it
    marker = img.voxel_to_world((16, 20, 20))
    k = tuple(int(round(v)) for v in sv.world_to_voxel(marker))
    assert sv.read()[k] == pytest.approx(1.0, abs=0.02)
    body = tuple(int(round(v)) for v in sv.world_to_voxel(img.voxel_to_world((8, 30, 10))))
    assert sv.read()[body] == pytest.approx(0.55, abs=1e-6)  # (100 + 1000) / 2000
    assert sv.dtype == np.float32
    # opened again: the same file, nothing prepared again
    assert prepare_volume(path, spec).path == sv.path and sv.path.stat().st_mtime_ns == os.stat(sv.path).st_mtime_ns
    # raw: the source's values and grid, voxel for voxel
    raw = prepare_volume(path, VolumeSpec(), loader=load)
    assert np.array_equal(raw.read(), load(path).array) and raw.origin == pytest.approx(img.origin)
    assert raw.read().dtype == np.int16


def test_a_2d_image_is_refused_in_one_line(tmp_path):
    png = tmp_path / "xray.png"
    save(Image(np.zeros((8, 8), np.uint8)), png)
    with pytest.raises(DataError) as e:
        prepare_volume(png)  # through the child process: its one-line error comes back
    assert "grey 3D volumes, not a 2D" in str(e.value) and "\n" not in str(e.value)


def test_a_patch_reads_only_the_blocks_it_covers(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, (64, 256, 256)).astype(np.int16)
    img = Image(arr, spacing=(2.5, 0.7, 0.7), origin=(0.0, 0.0, 0.0))
    sv = StoredVolume(write_volume(tmp_path / "v.b2nd", *_record(img)))
    assert sv.array.chunks == (16, 64, 64) and sv.array.blocks == (1, 64, 64)
    decoded: list[int] = []

    @sv.array.schunk.postfilter(np.int16)
    def count(inp, out, offset):  # runs once per block decompressed
        decoded.append(int(offset))
        out[:] = inp

    world = img.voxel_to_world((30, 100, 150))
    p = extract_patch_2d(sv, world, 50)
    assert p is not None and np.array_equal(p, arr[30, 75:125, 125:175])
    # one slice, a 50 x 50 window over a 64 x 64 tiling: at most 4 of the volume's 1,024 blocks
    assert 1 <= len(decoded) <= 4
    decoded.clear()
    assert extract_patch_3d(sv, world, 16, 1.0) is not None
    # 16 mm at 2.5 mm slices: 7-9 slices of 1-4 tiles each, not the volume
    assert 1 <= len(decoded) <= 9 * 4
    decoded.clear()
    sv.read((slice(None), slice(None), slice(None)))
    assert len(decoded) == 64 * 4 * 4  # the whole volume: every block


def _record(img: Image):
    return prepare_array(img, VolumeSpec())


def test_a_changed_source_is_prepared_again(tmp_path):
    path, _ = _phantom(tmp_path)
    first = prepare_volume(path, loader=load)
    assert prepare_volume(path, loader=load).path == first.path
    # rewrite the data with another value (the .mhd header names the same data file)
    _phantom(tmp_path, value=300)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewrite within the same mtime tick still counts
    second = prepare_volume(path, loader=load)
    assert second.path != first.path
    assert second.read()[10, 10, 10] == 300 and first.read()[10, 10, 10] == 100
    # another preparation is another folder, the source unchanged
    other = prepare_volume(path, VolumeSpec(crop_threshold=-500), loader=load)
    assert other.path.parent != second.path.parent and other.shape == (24, 34, 31)


def test_a_partial_file_is_never_read_as_a_volume(tmp_path):
    path, img = _phantom(tmp_path)
    good = prepare_volume(path, loader=load)
    data = good.path.read_bytes()
    # a file cut short under the final name (what a non-atomic writer killed half-way leaves)
    good.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a complete medlens volume"):
        StoredVolume(good.path)
    again = prepare_volume(path, loader=load)  # prepared again, whole
    assert again.path == good.path and np.array_equal(again.read(), img.array)
    # a killed builder's temporary (its PID is gone) is removed by the next build and never opened
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = good.path.parent / f".tmp-{dead.pid}-0123.b2nd"
    tmp.write_bytes(data[: len(data) // 3])
    good.path.unlink()
    prepare_volume(path, loader=load)
    assert not tmp.exists() and StoredVolume(good.path).shape == img.shape


def test_extraction_memory_stays_bounded_on_a_volume_far_larger_than_its_patches(tmp_path):
    """Patches from a 192 x 512 x 512 CT (96 MB of int16) in a separate process: peak RSS grows by a few MB, where
    holding the volume would add 96 MB."""
    y, x = np.ogrid[:512, :512]
    plane = (y * 3 + x).astype(np.int16)
    arr = np.empty((192, 512, 512), np.int16)
    for k in range(len(arr)):  # not constant, compressible
        arr[k] = (plane + 7 * k) % 1400 - 1000
    img = Image(arr, spacing=(1.25, 0.7, 0.7), origin=(-180.0, -180.0, -240.0))
    path = write_volume(tmp_path / "big.b2nd", *_record(img))
    del arr, img
    code = textwrap.dedent(f"""
        import resource, numpy as np
        from medlens.data.nodules import extract_patch_2d, extract_patch_3d
        from medlens.data.volume_store import StoredVolume
        sv = StoredVolume({str(path)!r})
        assert sv.shape == (192, 512, 512)
        rng = np.random.default_rng(0)
        pts = sv.voxel_to_world(rng.uniform([10, 40, 40], [182, 472, 472], (60, 3)))
        extract_patch_2d(sv, pts[0], 50); extract_patch_3d(sv, pts[0], 32, 1.0)  # first calls' own allocations
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for w in pts:
            assert extract_patch_2d(sv, w, 50) is not None and extract_patch_3d(sv, w, 32, 1.0) is not None
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 20, grown_mb  # the volume is 96 MB


def _plain_lung_mask(ct: Image, threshold_hu: float = -320.0) -> np.ndarray:
    """The lung mask in its plain whole-volume form (int32 labels, np.isin, scipy sizes): the reference that
    ``imaging.segment.lung_mask`` must equal while holding a fraction of the memory."""
    from scipy import ndimage

    def largest(mask, n):
        lab, k = ndimage.label(mask)
        if k <= n:
            return mask.astype(bool)
        sizes = ndimage.sum(mask, lab, range(1, k + 1))
        return np.isin(lab, np.argsort(sizes)[::-1][:n] + 1)

    air = ct.array < threshold_hu
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    lungs = largest(air & ~np.isin(lab, border[border > 0]), 2)
    biggest = largest(lungs, 1)
    if lungs.sum() > 0 and biggest.sum() / lungs.sum() > 0.9:
        lungs = biggest
    r = max(1, int(round(10.0 / ct.spacing[1])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    out = np.zeros_like(lungs)
    for k in np.flatnonzero(lungs.any((1, 2))):
        closed = cv2.morphologyEx(np.pad(lungs[k].astype(np.uint8), r), cv2.MORPH_CLOSE, kernel)[r:-r, r:-r]
        out[k] = ndimage.binary_fill_holes(closed.astype(bool))
    return out


def test_the_lean_lung_mask_is_the_plain_one(tmp_path):
    """``imaging.segment.lung_mask`` (negatives of `nodules extract`, `nodules detect`) gives the plain
    whole-volume mask voxel for voxel, from memory and from the store: two lungs with a vessel, air outside, a
    table-like slab."""
    arr = np.full((24, 96, 96), -1000, np.int16)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 48) / 40.0) ** 2 + ((xx - 48) / 44.0) ** 2 <= 1
    arr[:, body] = 40
    for cx in (30, 66):
        lung = ((yy - 48) / 26.0) ** 2 + ((xx - cx) / 13.0) ** 2 <= 1
        arr[2:22, lung] = -850
    arr[5:18, 46:50, 28:32] = 60  # a vessel in the left lung
    arr[:, 90:94, 10:86] = 200   # the table
    img = Image(arr, spacing=(2.0, 0.75, 0.75), origin=(0.0, 0.0, 0.0), modality="CT")
    path = tmp_path / "chest.mhd"
    save(img, path)
    expected = _plain_lung_mask(img)
    assert expected.sum() > 1000  # the phantom has lungs
    assert np.array_equal(lung_mask(img), expected)
    assert np.array_equal(lung_mask(prepare_volume(path, loader=load)), expected)


def test_store_folder_can_be_removed_any_time(tmp_path):
    path, img = _phantom(tmp_path)
    sv = prepare_volume(path, loader=load)
    shutil.rmtree(sv.path.parent)
    assert np.array_equal(prepare_volume(path, loader=load).read(), img.array)
