"""Hostile and careless inputs (issue 11): size bombs, data files outside their folder, non-UTF-8 paths,
NaN/inf, pixdim 0, truncated PNGs, out-of-volume points, negative strengths and counts, half-written
DICOM folders. Each case runs as a user would (``medlens`` in a subprocess) where the issue describes
CLI behaviour: the exit code is not 0 (and not a signal), stderr is one line naming the file, there
is no traceback and nothing half-written is left behind. The refusals of bad option values (``process``
strengths, ``nodules extract`` counts) run the same command line in this process (``tests/clirun.py``): each
subprocess spent its 3-9 s importing, twenty times.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from clirun import medlens as medlens_inproc
from probes import load_in_child, one_line_error
from medlens.errors import ConfigError, DataError, MedlensWarning
from medlens.io import load, save

MEDLENS = Path(sys.executable).with_name("medlens")  # .venv/bin/medlens
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def medlens(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(MEDLENS), *map(os.fspath, args)], capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def png_bytes(width: int, height: int, raw: bytes, depth: int = 8, color: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------- 1. resource limits


def test_png_header_bomb_is_refused_fast_without_allocating(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_bytes(12000, 12000, b"\0" * 12001))  # one zero row; the header claims 144 M pixels
    assert len(p.read_bytes()) < 130
    out = load_in_child(p)
    assert "bomb.png" in out.get("error", "") and "144,000,000 pixels" in out["error"], out
    assert "MEDLENS_MAX_PIXELS" in out["error"]
    assert out["seconds"] < 1.0 and out["rss_growth_mb"] < 40, out
    one_line_error(medlens("info", p), "bomb.png", "MEDLENS_MAX_PIXELS")


def test_pixel_limit_is_a_setting_for_png_jpeg_tiff_and_dicom(tmp_path, data_root):
    PILImage.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a.tif")
    jpeg = data_root / "chasedb1" / "CHASEDB1" / "Image_01L.jpg"
    for f, shape in ((tmp_path / "a.tif", (64, 64)), (jpeg, (960, 999)), (CT_SMALL, (128, 128))):
        assert load(f).array.shape[:2] == shape  # fine by default
        one_line_error(medlens("info", f, env={"MEDLENS_MAX_PIXELS": "4000"}), f.name,
                       f"{shape[0] * shape[1]:,} pixels", "over the limit of 4,000 pixels", "MEDLENS_MAX_PIXELS")
    one_line_error(medlens("info", jpeg, env={"MEDLENS_MAX_PIXELS": "lots"}), "MEDLENS_MAX_PIXELS", "whole number")


def _nifti_gz_bomb(path: Path, shape=(2048, 2048, 1024), member=64 << 20) -> None:
    """A real bomb: 4 GiB of zeros as concatenated gzip members, about 4 MB on disk."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), code=1)
    head = hdr.binaryblock + b"\0" * 4
    zeros = gzip.compress(b"\0" * member, compresslevel=9)
    total = int(np.prod(shape))
    with open(path, "wb") as f:
        f.write(gzip.compress(head + b"\0" * (member - len(head))))
        for _ in range(total // member):
            f.write(zeros)


def test_nifti_gz_bomb_is_refused_from_its_header(tmp_path):
    p = tmp_path / "bomb.nii.gz"
    _nifti_gz_bomb(p)
    assert p.stat().st_size < 8 << 20
    out = load_in_child(p)
    assert "bomb.nii.gz" in out.get("error", "") and "2048 x 2048 x 1024" in out["error"], out
    assert "MEDLENS_MAX_VOXELS" in out["error"] and out["seconds"] < 2.0 and out["rss_growth_mb"] < 40, out


def test_decompressed_size_limit_for_nifti_gz_and_deflated_dicom(tmp_path):
    nii = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((128, 128, 128), np.uint8), np.eye(4)), nii)
    assert load(nii).shape == (128, 128, 128)
    env = {"MEDLENS_MAX_DECOMPRESSED_BYTES": "1_000_000"}
    one_line_error(medlens("info", nii, env=env), "big.nii.gz", "MEDLENS_MAX_DECOMPRESSED_BYTES")
    ds = pydicom.dcmread(CT_SMALL)
    ds.add_new(0x00091010, "OB", b"\0" * 50_000_000)  # 50 MB of zeros: a 70 kB file once deflated
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    dcm = tmp_path / "deflated.dcm"
    ds.save_as(dcm, enforce_file_format=True)
    assert dcm.stat().st_size < 200_000
    out = load_in_child(dcm, env={"MEDLENS_MAX_DECOMPRESSED_BYTES": "10_000_000"})
    assert "deflated.dcm" in out.get("error", "") and "MEDLENS_MAX_DECOMPRESSED_BYTES" in out["error"], out
    assert out["rss_growth_mb"] < 40, out


def test_dicom_size_is_checked_before_decoding(tmp_path, data_root):
    ds = pydicom.dcmread(CT_SMALL)
    ds.NumberOfFrames = 100_000  # the header claims 1.6 G voxels; the pixel data holds one frame
    p = tmp_path / "frames.dcm"
    ds.save_as(p)
    out = load_in_child(p)
    assert "frames.dcm" in out.get("error", "") and "100000 x 128 x 128" in out["error"], out
    assert "MEDLENS_MAX_VOXELS" in out["error"]
    series = tmp_path / "series"
    series.mkdir()
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    for f in files[60:65]:  # five adjacent slices
        shutil.copy(f, series / f.name)
    assert load(series).shape == (5, 512, 512)
    one_line_error(medlens("info", series, env={"MEDLENS_MAX_VOXELS": "1000000"}), "series", "5 x 512 x 512",
                   "MEDLENS_MAX_VOXELS")


def test_mhd_and_nrrd_sizes_are_checked_from_the_header(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    for name in ("v.mhd", "v.nrrd"):
        sitk.WriteImage(img, str(tmp_path / name))
        assert load(tmp_path / name).shape == (4, 8, 8)
        one_line_error(medlens("info", tmp_path / name, env={"MEDLENS_MAX_VOXELS": "100"}), name, "4 x 8 x 8",
                       "MEDLENS_MAX_VOXELS")
    text = (tmp_path / "v.mhd").read_text().replace("DimSize = 8 8 4", "DimSize = 4096 4096 4096")
    (tmp_path / "huge.mhd").write_text(text)  # 68 G voxels claimed over a 512-byte .raw
    out = load_in_child(tmp_path / "huge.mhd")
    assert "huge.mhd" in out.get("error", "") and "MEDLENS_MAX_VOXELS" in out["error"], out


# ---------------------------------------------------------------------- 2. MHD data file confined


def _mhd_pointing_at(folder: Path, data_file: str, name: str = "evil.mhd") -> Path:
    p = folder / name
    p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 10 10 1\nElementType = MET_UCHAR\n"
                 f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    return p


def test_mhd_data_file_outside_its_folder_is_refused(tmp_path):
    evil = _mhd_pointing_at(tmp_path, "/etc/passwd")
    with pytest.raises(DataError, match=r"evil.mhd: its data file '/etc/passwd' lies outside"):
        load(evil)
    secret = np.frombuffer(Path("/etc/passwd").read_bytes()[:100], np.uint8)
    assert np.array_equal(load(evil, allow_outside=True).array.ravel(), secret)  # the explicit flag reads it
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "x.raw").write_bytes(bytes(range(100)))
    with pytest.raises(DataError, match="'../x.raw' lies outside"):
        load(_mhd_pointing_at(sub, "../x.raw"))
    (sub / "link.raw").symlink_to(tmp_path / "x.raw")  # a link inside the folder that leads out of it
    with pytest.raises(DataError, match="'link.raw' lies outside"):
        load(_mhd_pointing_at(sub, "link.raw", "linked.mhd"))
    (sub / "inside.raw").write_bytes(bytes(range(100)))
    assert load(_mhd_pointing_at(sub, "inside.raw", "fine.mhd")).array.ravel().tolist() == list(range(100))
    nhdr = sub / "evil.nhdr"
    nhdr.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 10 10 1\nencoding: raw\ndata file: ../x.raw\n\n")
    with pytest.raises(DataError, match="evil.nhdr: its data file '../x.raw' lies outside"):
        load(nhdr)


def test_mhd_outside_from_cli_needs_allow_outside(tmp_path):
    evil = _mhd_pointing_at(tmp_path, "/etc/passwd")
    out = tmp_path / "out.nii.gz"
    one_line_error(medlens("convert", evil, out), "evil.mhd", "outside", "--allow-outside")
    assert not out.exists()
    r = medlens("convert", evil, out, "--allow-outside")
    assert r.returncode == 0 and out.exists(), r.stderr


# ----------------------------------------------------------------------------- 3. non-UTF-8 paths


def _bad_name(folder: Path, name: bytes) -> str:
    return os.fsdecode(os.fsencode(folder) + b"/" + name)


@pytest.mark.parametrize("name", [b"out\xff.nii.gz", b"out\xff.mhd"])
def test_convert_to_a_non_utf8_path(tmp_path, data_root, name):
    out = tmp_path / "o"
    out.mkdir()
    one_line_error(medlens("convert", data_root / "mri-seg" / "breast1_image.nrrd", _bad_name(out, name)),
                   "out\\xff", "not valid UTF-8")
    assert os.listdir(out) == []  # no hidden .medlens-* folder, no partial file


def test_process_register_and_lidc_refuse_non_utf8_outputs(tmp_path, data_root):
    img = data_root / "mri-seg" / "breast1_image.nrrd"
    out = tmp_path / "o"
    out.mkdir()
    one_line_error(medlens("process", img, _bad_name(out, b"p\xff.nrrd"), "--steps", "gaussian:1"),
                   "p\\xff.nrrd", "not valid UTF-8")
    one_line_error(medlens("register", img, img, out / "r.nii.gz", "--transform", _bad_name(out, b"t\xff.tfm")),
                   "t\\xff.tfm", "not valid UTF-8")
    one_line_error(medlens("nodules", "lidc", data_root / "lidc-idri-0001" / "069.xml", data_root / "lidc-idri-0001",
                           "--mask-out", _bad_name(out, b"m\xff.nii.gz")), "m\\xff.nii.gz", "not valid UTF-8")
    assert os.listdir(out) == []  # the register output was not written either: refused before the work


def test_writer_and_reader_refuse_non_utf8_paths(tmp_path, data_root):
    """``segment`` writes its masks through ``io.save``; inputs named so are refused too. The library
    calls run in a child process: a regression aborts the child (SIGABRT), not the test session."""
    code = f"""
import os, sys, SimpleITK as sitk
from medlens.errors import DataError
from medlens.imaging.register import Registration
from medlens.io import load, save
img = load({str(data_root / "mri-seg" / "breast1_label.nrrd")!r})
folder = os.fsencode({str(tmp_path)!r})
writes = [lambda p: save(img, p)] * 3 + [lambda p: Registration(sitk.Euler3DTransform(), 0.0, "rigid").save(p)]
for name, write in zip([b"m\\xff.nii.gz", b"m\\xff.nrrd", b"sub\\xff/m.mhd", b"t\\xff.tfm"], writes):
    try:
        write(os.fsdecode(folder + b"/" + name))
        print("written", name)
    except DataError as e:
        assert "not valid UTF-8" in str(e), e
        print("refused", name)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split().count("refused") == 4, r.stdout
    assert os.listdir(tmp_path) == []
    bad_in = _bad_name(tmp_path, b"in\xff.nrrd")
    shutil.copy(data_root / "mri-seg" / "breast1_label.nrrd", bad_in)
    one_line_error(medlens("info", bad_in), "in\\xff.nrrd", "not valid UTF-8")


# ------------------------------------------------------------------------------------- 4. NaN / inf


def test_one_inf_pixel_is_refused_naming_the_file(tmp_path):
    a = np.ones((32, 32), np.float32)
    a[3, 4] = np.inf
    np.save(tmp_path / "inf.npy", a)
    one_line_error(medlens("info", tmp_path / "inf.npy"), "inf.npy", "1 of 1,024 values are NaN or infinite")
    b = np.ones((32, 32), np.float32)
    b[np.unravel_index(np.arange(9) * 100, b.shape)] = np.nan
    PILImage.fromarray(b, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif: 9 of 1,024 values are NaN or infinite"):
        load(tmp_path / "nan.tif")
    sitk.WriteImage(sitk.GetImageFromArray(np.where(np.eye(8) > 0, -np.inf, 0).astype(np.float32)),
                    str(tmp_path / "inf.mhd"))
    with pytest.raises(DataError, match="inf.mhd: 8 of 64 values"):
        load(tmp_path / "inf.mhd")
    with pytest.warns(MedlensWarning, match="nan.tif: 9 of 1,024"):
        assert np.isnan(load(tmp_path / "nan.tif", allow_nonfinite=True).array).sum() == 9


def test_all_nan_volume_is_refused_by_convert_view_and_process(tmp_path):
    p = tmp_path / "allnan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 7, 8), np.nan, np.float32), np.eye(4)), p)
    out = tmp_path / "o"
    for args in (("convert", p, out / "c.nii.gz"), ("view", p, out / "views"),
                 ("process", p, out / "p.nii.gz", "--steps", "stretch")):
        one_line_error(medlens(*args), "allnan.nii.gz", "every value (336) is NaN")
    assert not out.exists()


# ------------------------------------------------------------------------- 5. pixdim, truncated PNG


def _nifti_with_pixdim(path: Path, pixdim, sform: bool) -> Path:
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([0.5, 0.5, 2.0, 1.0]))
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1:4]
    raw[252:256] = struct.pack("<hh", 1, 1 if sform else 0)  # qform_code, sform_code
    path.write_bytes(bytes(raw))
    return path


def test_nifti_pixdim_zero_is_never_read_as_1mm(tmp_path):
    zero = _nifti_with_pixdim(tmp_path / "zero.nii", (0.5, 0.0, 2.0), sform=False)
    one_line_error(medlens("info", zero), "zero.nii", "pixdim (0.5, 0, 2)", "refusing to guess 1 mm")
    with pytest.raises(DataError, match=r"nanpix.nii: NIfTI pixdim \(nan, 0.5, 2\)"):
        load(_nifti_with_pixdim(tmp_path / "nanpix.nii", (np.nan, 0.5, 2.0), sform=False))
    with pytest.warns(MedlensWarning, match="sformed.nii: NIfTI pixdim .* the spacing is taken from the sform"):
        img = load(_nifti_with_pixdim(tmp_path / "sformed.nii", (0.0, 0.0, 0.0), sform=True))
    assert img.spacing == pytest.approx((2.0, 0.5, 0.5))
    with pytest.warns(MedlensWarning, match="negative.nii: NIfTI pixdim .* is negative"):
        img = load(_nifti_with_pixdim(tmp_path / "negative.nii", (-0.5, 0.5, 2.0), sform=False))
    assert img.spacing == pytest.approx((2.0, 0.5, 0.5))


def test_truncated_png_with_valid_header_is_refused(tmp_path):
    from PIL import ImageFile

    rows = np.random.default_rng(0).integers(1, 255, (64, 64), dtype=np.uint8)
    raw = b"".join(b"\0" + r.tobytes() for r in rows)
    p = tmp_path / "short.png"
    p.write_bytes(png_bytes(64, 64, raw[: len(raw) // 2]))  # a complete zlib stream holding half the rows
    one_line_error(medlens("info", p), "short.png", "PNG pixel data ends early", "truncated")
    with pytest.raises(DataError, match="ends early"):
        load(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    p.write_bytes(png_bytes(64, 64, raw))
    assert np.array_equal(load(p).array, rows)
    full = p.read_bytes()
    for cut in range(40, len(full), 97):  # every cut is refused or reads the same pixels: never zeros
        p.write_bytes(full[:cut])
        try:
            assert np.array_equal(load(p).array, rows), cut
        except DataError:
            pass
    PILImage.fromarray(rows).save(tmp_path / "interlaced.png", interlace=1)
    assert np.array_equal(load(tmp_path / "interlaced.png").array, rows)


# ---------------------------------------------------- 6. points, strengths and counts from the CLI


def test_view_point_outside_the_volume_is_refused(tmp_path, data_root):
    img = data_root / "mri-seg" / "breast1_image.nrrd"
    out = tmp_path / "views"
    one_line_error(medlens("view", img, out, "--point", "1e6,0,0"), "breast1_image.nrrd", "lies outside the volume")
    one_line_error(medlens("view", img, out, "--point", "1,2"), "--point '1,2'", "three finite numbers")
    assert not out.exists()
    centre = load(img).voxel_to_world((10, 60, 22))
    r = medlens("view", img, out, "--point", ",".join(f"{v:.3f}" for v in centre))
    assert r.returncode == 0 and len(list(out.glob("*.png"))) == 4, r.stderr


@pytest.mark.parametrize("step", ["gaussian:-5", "gaussian:nan", "median:0", "median:2.5", "diffusion:-1",
                                  "clahe:0", "lowpass:-0.1", "unsharp:-1", "resample:0", "bilateral:inf",
                                  "stretch:5", "denoise:bogus", "window:nonsense"])
def test_process_refuses_invalid_strengths(tmp_path, data_root, step):
    out = tmp_path / "p.nii.gz"
    one_line_error(medlens_inproc("process", data_root / "mri-seg" / "breast1_image.nrrd", out, "--steps", step),
                   step.split(":")[0])
    assert not out.exists()


def test_filters_refuse_negative_strengths():
    from medlens.imaging import enhance, filters

    a = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    for call in (lambda: filters.gaussian(a, -5), lambda: filters.median(a, 0), lambda: filters.bilateral(a, -1),
                 lambda: filters.fft_filter(a, "lowpass", 0), lambda: enhance.unsharp(a, amount=-1),
                 lambda: enhance.clahe((a * 255).astype(np.uint8), -2)):
        with pytest.raises(ConfigError, match="must be"):
            call()
    assert not np.array_equal(filters.gaussian(a, 1.0), a)


@pytest.mark.parametrize("option,value", [("--neg-ratio", "-1"), ("--neg-ratio", "nan"), ("--size", "0"),
                                          ("--size", "-4"), ("--spacing", "-1"), ("--seed", "-1"), ("--dims", "4")])
def test_nodules_extract_refuses_negative_counts(tmp_path, data_root, option, value):
    out = tmp_path / "p.h5"
    one_line_error(medlens_inproc("nodules", "extract", "--scans", data_root / "luna16", "--annotations",
                                  data_root / "luna16" / "annotations.csv", "--out", out, option, value),
                   option, value.lstrip("-") if value != "nan" else "nan")
    assert not out.exists()


def test_zero_negatives_means_zero(data_root):
    from medlens.workflow.nodules import sample_negatives

    ct = load(next((data_root / "luna16").glob("*.mhd")))
    rng = np.random.default_rng(0)
    assert sample_negatives(ct, np.zeros((0, 3)), 0, 20.0, rng).shape == (0, 3)
    assert sample_negatives(ct, np.zeros((0, 3)), 3, 20.0, rng).shape == (3, 3)


# ------------------------------------------------------------------ 7. atomic DICOM folder output


def test_dicom_series_output_refuses_a_non_empty_folder(tmp_path, data_root):
    dst = tmp_path / "series"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    one_line_error(medlens("convert", data_root / "mri-seg" / "breast1_image.nrrd", dst), "series",
                   "not empty")
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="not empty"):
        save(load(data_root / "mri-seg" / "breast1_image.nrrd"), dst)


def test_convert_killed_midway_leaves_no_series_that_loads(tmp_path, data_root):
    parent = tmp_path / "exports"
    parent.mkdir()
    dst = parent / "ct"
    proc = subprocess.Popen([str(MEDLENS), "convert", str(data_root / "lidc-idri-0001"), str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = 0
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        seen = sum(1 for f in parent.rglob("*.dcm"))
        if seen >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 10 <= seen < 133, (proc.returncode, seen)
    assert not dst.exists()  # only a hidden temporary folder holds the first slices
    one_line_error(medlens("info", dst), "ct", "not found")
    r = medlens("info", parent)
    assert "512, 512)" not in r.stdout.decode()  # the hidden partial series is not offered as a volume
    r = medlens("convert", data_root / "lidc-idri-0001", dst)
    assert r.returncode == 0, r.stderr
    assert len(list(dst.glob("*.dcm"))) == 133 and not list(dst.glob(".*"))
    assert load(dst).shape == (133, 512, 512)


def test_hidden_folders_are_not_part_of_a_series(tmp_path, data_root):
    hidden = tmp_path / "scan" / ".ct.x1y2.partial"
    hidden.mkdir(parents=True)
    for f in sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[:4]:
        shutil.copy(f, hidden / f.name)
    with pytest.raises(DataError, match="no DICOM files"):
        load(tmp_path / "scan")


def test_limits_module_documents_its_settings():
    import medlens.io.limits as limits

    for name in ("MEDLENS_MAX_PIXELS", "MEDLENS_MAX_VOXELS", "MEDLENS_MAX_DECOMPRESSED_BYTES"):
        assert name in limits.__doc__ and name in limits.DEFAULTS
    assert limits.DEFAULTS == {"MEDLENS_MAX_PIXELS": 2**26, "MEDLENS_MAX_VOXELS": 2**28,
                               "MEDLENS_MAX_DECOMPRESSED_BYTES": 2**32}
