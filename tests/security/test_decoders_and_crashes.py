"""Issue 25, items 7 and 10: decoder bombs and the remaining input crashes.

- A compressed DICOM frame is sized from its own codestream header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ,
  the RLE segment table) before any decoder runs: a 1.8 KB file whose Rows/Columns say 64 but whose JPEG SOF
  says 40000 x 40000 cost 15-42 s and gigabytes before it was refused.
- A header that declares 10^9 images, string labels, a NaN spacing and a 1e-4 mm voxel in ``nodules detect``
  are one-line errors, not a MemoryError, a numpy traceback, NaN geometry or a 40 GB structuring element.
- ``nodules froc`` computes its bootstrap with array operations (the official 754k-row size in seconds, not
  15+ minutes) and reports progress; its figures equal the loop over resamples it replaces.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from clirun import medlens
from probes import load_in_child, one_line_error
from medlens.errors import DataError, MedlensWarning
from medlens.io import load
from medlens.io.image import Image

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MEDLENS = Path(sys.executable).with_name("medlens")  # .venv/bin/medlens


# ------------------------------------------------------------------------------------- building DICOMs


def jpeg_64() -> bytes:
    b = io.BytesIO()
    PILImage.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(b, "JPEG", quality=50)
    return b.getvalue()


def claim_sof(jpeg: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its SOF0 frame header claiming ``height`` x ``width`` (the scan data unchanged)."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]


def jpeg_dicom(path: Path, frames: list[bytes], z: float = 0.0, series: str | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 64, 64, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def with_frame(src: str, path: Path, edit) -> Path:
    """A copy of a pydicom test file whose (first) compressed frame is ``edit(frame)``."""
    ds = pydicom.dcmread(TEST_FILES / src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    frames[0] = edit(frames[0])
    ds.PixelData = encapsulate(frames)
    ds.save_as(path)
    return path


def patch(data: bytes, offset: int, fmt: str, *values) -> bytes:
    raw = struct.pack(fmt, *values)
    return data[:offset] + raw + data[offset + len(raw):]


# ------------------------------------------------------------------------------------------ decoder bombs


def test_jpeg_sof_bomb_is_refused_before_any_decoder_runs(tmp_path):
    p = jpeg_dicom(tmp_path / "bomb.dcm", [claim_sof(jpeg_64(), 40000, 40000)])
    assert p.stat().st_size < 2000
    out = load_in_child(p, memory_gb=3)
    err = out.get("error", "")
    assert "bomb.dcm" in err and "40000 x 40000" in err and "64 x 64" in err, out
    assert "refused before decoding" in err and "MEDLENS_MAX_PIXELS" in err, out
    # before the fix: 15 s and 2.9 GB (capped at 3 GB) inside pylibjpeg, then a generic decode error
    assert out["seconds"] < 1.0 and out["rss_growth_mb"] < 50, out
    one_line_error(medlens("info", p), "bomb.dcm", "40000 x 40000", "64 x 64")
    good = jpeg_dicom(tmp_path / "good.dcm", [jpeg_64()])
    assert load(good).shape == (64, 64)


def test_a_codestream_that_disagrees_with_rows_and_columns_is_refused(tmp_path):
    # within the pixel limit but not what the DICOM header says: refused, both sizes named
    p = jpeg_dicom(tmp_path / "small.dcm", [claim_sof(jpeg_64(), 64, 32)])
    with pytest.raises(DataError, match=r"small\.dcm: the JPEG codestream of the frame says 64 x 32 x 1 but the "
                                        r"DICOM header says 64 x 64 x 1") as e:
        load(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("src, kind, edit", [
    # JPEG-LS SOF55 (FFF7) right after SOI: length, precision, then Y and X at byte 7
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS", lambda f: patch(f, 7, ">HH", 40000, 40000)),
    # JPEG 2000 SOC, SIZ: Lsiz, Rsiz, then Xsiz, Ysiz at byte 8
    ("MR_small_jp2klossless.dcm", "JPEG 2000", lambda f: patch(f, 8, ">II", 40000, 40000)),
    # with an image offset the size is Xsiz - XOsiz by Ysiz - YOsiz: 80000 - 40000
    ("MR_small_jp2klossless.dcm", "JPEG 2000", lambda f: patch(f, 8, ">IIII", 80000, 80000, 40000, 40000)),
], ids=["jpeg-ls", "jpeg2000", "jpeg2000-offset"])
def test_jpeg_ls_and_jpeg_2000_headers_are_read_before_decoding(tmp_path, src, kind, edit):
    assert load(TEST_FILES / src).shape == (64, 64)  # the file as published decodes
    p = with_frame(src, tmp_path / "crafted.dcm", edit)
    t0 = time.time()
    with pytest.raises(DataError, match=rf"crafted\.dcm: the {kind} codestream of the frame says 40000 x 40000 x 1 = "
                                        r"1,600,000,000 pixels, over the limit of 67,108,864 \(raise MEDLENS_MAX_PIXELS "
                                        r"to allow it\); the DICOM header says 64 x 64 x 1 \(Rows x Columns x "
                                        r"SamplesPerPixel\): refused before decoding"):
        load(p)
    assert time.time() - t0 < 1


def test_rle_segment_table_is_checked_against_the_frame(tmp_path):
    assert load(TEST_FILES / "MR_small_RLE.dcm").shape == (64, 64)  # 16-bit: two segments
    p = with_frame("MR_small_RLE.dcm", tmp_path / "one.dcm", lambda f: patch(f, 0, "<I", 1))
    with pytest.raises(DataError, match=r"one\.dcm: the RLE header of the frame names 1 segment\(s\), but the "
                                        r"DICOM header says 64 x 64 x 1 .* needs 2: refused before decoding"):
        load(p)
    # a segment longer than twice its plane decodes to more than the plane (up to 64 bytes per byte)
    p = with_frame("MR_small_RLE.dcm", tmp_path / "long.dcm", lambda f: f + b"\x81\x00" * 5000)
    with pytest.raises(DataError, match=r"long\.dcm: RLE segment 2 of the frame is 14,160 bytes, more than a 64 x 64 "
                                        r"plane can take \(8,194\)"):
        load(p)
    p = with_frame("MR_small_RLE.dcm", tmp_path / "offsets.dcm", lambda f: patch(f, 8, "<I", 10))
    with pytest.raises(DataError, match=r"offsets\.dcm: the frame: unreadable RLE header \(RLE segment offsets "
                                        r"\(64, 10\) are not increasing"):
        load(p)


def test_every_frame_of_a_multiframe_file_and_every_slice_of_a_series_is_checked(tmp_path):
    good, bomb = jpeg_64(), claim_sof(jpeg_64(), 40000, 40000)
    assert load(jpeg_dicom(tmp_path / "two.dcm", [good, good])).shape == (2, 64, 64)
    with pytest.raises(DataError, match=r"mf\.dcm: the JPEG codestream of frame 2 of 2 says 40000 x 40000 x 1"):
        load(jpeg_dicom(tmp_path / "mf.dcm", [good, bomb]))
    series = tmp_path / "series"
    series.mkdir()
    uid = generate_uid()
    jpeg_dicom(series / "a.dcm", [good], z=0.0, series=uid)
    jpeg_dicom(series / "b.dcm", [good], z=1.0, series=uid)
    assert load(series).shape == (2, 64, 64)
    jpeg_dicom(series / "c.dcm", [bomb], z=2.0, series=uid)
    t0 = time.time()
    with pytest.raises(DataError, match=r"c\.dcm: the JPEG codestream of the frame says 40000 x 40000 x 1"):
        load(series)
    assert time.time() - t0 < 2


def test_frames_beyond_number_of_frames_are_never_decoded(tmp_path):
    """pydicom's default decodes the extra JPEG frames it finds (allow_excess_frames): a third fragment
    that is a bomb would be decoded although NumberOfFrames says 2 and nothing checked it."""
    good = jpeg_64()
    p = jpeg_dicom(tmp_path / "excess.dcm", [good, good])
    ds = pydicom.dcmread(p)
    ds.PixelData = encapsulate([good, good, claim_sof(good, 40000, 40000)], has_bot=False)
    ds.save_as(p)
    out = load_in_child(p, memory_gb=3)
    assert out.get("loaded") == [2, 64, 64], out
    assert out["seconds"] < 1.0 and out["rss_growth_mb"] < 50, out


def test_raster_jpeg_bomb_is_refused_by_pil_limit_set_from_the_setting(tmp_path):
    """Raster files were already guarded (PIL reads the SOF in open(); its MAX_IMAGE_PIXELS is set from
    MEDLENS_MAX_PIXELS): kept here so that the DICOM and raster paths are known to agree."""
    b = io.BytesIO()
    PILImage.fromarray(np.zeros((64, 64), np.uint8)).save(b, "JPEG")
    p = tmp_path / "bomb.jpg"
    p.write_bytes(claim_sof(b.getvalue(), 40000, 40000))
    out = load_in_child(p, memory_gb=3)
    assert "bomb.jpg" in out.get("error", "") and "MEDLENS_MAX_PIXELS" in out["error"], out
    assert out["seconds"] < 1.0 and out["rss_growth_mb"] < 50, out


# ------------------------------------------------------------------------- crashes become one-line errors


def _npz(path: Path, arrays: dict[str, np.ndarray], fake: dict[str, tuple] | None = None) -> Path:
    """An npz of ``arrays``; each key of ``fake`` becomes a member whose npy header declares that shape
    (uint8) over 16 bytes of data."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, a in arrays.items():
            b = io.BytesIO()
            np.lib.format.write_array(b, np.asarray(a), allow_pickle=False)
            z.writestr(f"{k}.npy", b.getvalue())
        for k, shape in (fake or {}).items():
            b = io.BytesIO()
            np.lib.format.write_array_header_1_0(b, {"descr": "|u1", "fortran_order": False, "shape": shape})
            z.writestr(f"{k}.npy", b.getvalue() + b"\0" * 16)
    return path


def _medmnist_arrays(labels_dtype=np.uint8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for s, n in (("train", 20), ("val", 6), ("test", 6)):
        out[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        out[f"{s}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(labels_dtype)
    return out


def test_npz_declaring_a_billion_images_is_refused_from_its_header(tmp_path):
    from medlens.data.medmnist import load_medmnist

    arrays = _medmnist_arrays()
    assert len(load_medmnist(None, path=_npz(tmp_path / "fine.npz", arrays)).train) == 20
    del arrays["train_images"]
    p = _npz(tmp_path / "billion.npz", arrays, fake={"train_images": (10**9, 28, 28)})
    assert p.stat().st_size < 20_000
    t0 = time.time()
    with pytest.raises(DataError, match=r"billion\.npz: array 'train_images' declares shape 1000000000 x 28 x 28 of "
                                        r"uint8 = 784,000,000,000 bytes but holds only 16") as e:
        load_medmnist(None, path=p)  # before: MemoryError (730 GiB)
    assert time.time() - t0 < 2 and "\n" not in str(e.value)
    # a declared size within the file but over the decompression limit (a file outside the catalogue)
    os.environ["MEDLENS_MAX_DECOMPRESSED_BYTES"] = "10000"
    try:
        with pytest.raises(DataError, match=r"fine\.npz: its arrays expand to 25,120 bytes, over the limit of 10,000 "
                                            r"\(raise MEDLENS_MAX_DECOMPRESSED_BYTES"):
            load_medmnist(None, path=tmp_path / "fine.npz")
    finally:
        del os.environ["MEDLENS_MAX_DECOMPRESSED_BYTES"]


def test_npy_and_npz_images_declaring_more_than_they_hold(tmp_path):
    p = tmp_path / "short.npy"
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "|u1", "fortran_order": False, "shape": (64, 512, 512)})
    p.write_bytes(b.getvalue() + b"\0" * 100)
    with pytest.raises(DataError, match=r"short\.npy: the array declares shape 64 x 512 x 512 of uint8 = "
                                        r"16,777,216 bytes but holds only 100"):
        load(p)
    q = _npz(tmp_path / "short.npz", {}, fake={"test_images": (64, 512, 512)})
    with pytest.raises(DataError, match=r"short\.npz: array 'test_images' declares shape 64 x 512 x 512"):
        load(q)


def test_a_zip_member_that_claims_more_than_deflate_can_expand_is_refused(tmp_path):
    from medlens.data.medmnist import read_npz

    p = _npz(tmp_path / "a.npz", _medmnist_arrays())
    raw = bytearray(p.read_bytes())
    # the central directory's uncompressed size of the first member (offset 24 in its record) -> 4 GB
    cd = raw.index(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = struct.pack("<I", 0xFFFF0000)
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.npz: array 'train_images' claims 4,294,901,760 bytes, more than its"):
        read_npz(p)


def test_string_labels_in_an_npz_are_refused(tmp_path):
    from medlens.data.medmnist import load_medmnist

    arrays = _medmnist_arrays()
    arrays["train_labels"] = np.array([["normal"], ["pneumonia"]] * 10)
    p = _npz(tmp_path / "strings.npz", arrays)
    with pytest.raises(DataError, match=r"strings\.npz: 'train_labels' holds <U9 values; integer class indices "
                                        r"expected"):
        load_medmnist(None, path=p)  # before: numpy's UFuncTypeError from np.mod on strings
    arrays = _medmnist_arrays()
    arrays["val_labels"] = arrays["val_labels"].astype(np.float32) + 0.5
    with pytest.raises(DataError, match=r"'val_labels' holds float32 values; integer class indices expected"):
        load_medmnist(None, path=_npz(tmp_path / "floats.npz", arrays))


def test_nan_spacing_is_refused_in_every_reader(tmp_path):
    ct = TEST_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(ct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: 'nan' is no valid DS (the point of the test)
        ds.PixelSpacing = ["nan", "0.5"]
    ds.save_as(tmp_path / "ps.dcm")
    # the values are shown (a list in square brackets was swallowed by the console's markup)
    one_line_error(medlens("info", tmp_path / "ps.dcm"), "ps.dcm", "PixelSpacing", "(nan, 0.5)")
    # one slice: its z spacing comes from SpacingBetweenSlices; before, a NaN became the volume's spacing
    (tmp_path / "one").mkdir()
    ds = pydicom.dcmread(ct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SpacingBetweenSlices = "nan"
    ds.save_as(tmp_path / "one" / "a.dcm")
    one_line_error(medlens("info", tmp_path / "one"), "a.dcm", "SpacingBetweenSlices (nan)")
    # a multi-frame file without frame positions takes SliceThickness
    ds = pydicom.dcmread(ct)
    ds.NumberOfFrames, ds.PixelData, ds.SliceThickness = 2, ds.PixelData * 2, "-2"
    del ds.ImagePositionPatient, ds.SpacingBetweenSlices
    ds.save_as(tmp_path / "mf.dcm")
    with pytest.raises(DataError, match=r"mf\.dcm: SliceThickness \(-2\) is not a finite positive number"):
        load(tmp_path / "mf.dcm")
    # NIfTI without an sform: pixdim is the spacing
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.int16)
    hdr["pixdim"][1:4] = [np.nan, 1, 1]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, hdr), tmp_path / "v.nii")
    with pytest.raises(DataError, match=r"v\.nii: NIfTI pixdim \(nan, 1, 1\)"):
        load(tmp_path / "v.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(tmp_path / "v.mhd"))
    text = (tmp_path / "v.mhd").read_text().replace("ElementSpacing = 1 1 1", "ElementSpacing = nan 1 1")
    (tmp_path / "nan.mhd").write_text(text)
    with pytest.raises(DataError, match=r"nan\.mhd: invalid voxel spacing"):
        load(tmp_path / "nan.mhd")
    # the backstop: no Image exists with a spacing that is not finite and positive
    with pytest.raises(DataError, match=r"x\.png: voxel spacing \(nan, 1\) mm must be finite and > 0"):
        Image(np.zeros((4, 4)), spacing=(float("nan"), 1.0), meta={"source": "x.png"})
    with pytest.raises(DataError, match=r"voxel spacing \(1, 0, 1\) mm"):
        Image(np.zeros((2, 4, 4)), spacing=(1.0, 0.0, 1.0))


def test_nodules_detect_refuses_a_1e_4_mm_voxel(tmp_path):
    """At 1e-4 mm the lung mask's 10 mm closing disk is 200,001 voxels wide (a 40 GB structuring element):
    refused in one line before any of it. Run as a process capped at 3 GB so a regression fails, not the machine."""
    rng = np.random.default_rng(0)
    vol = np.full((24, 64, 64), -1000, np.int16)
    vol[:, 8:56, 8:56] = 40
    vol[:, 16:48, 12:30] = -850
    vol[:, 16:48, 34:52] = -850
    vol += rng.integers(-20, 20, vol.shape, dtype=np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((1e-4, 1e-4, 2.5))
    sitk.WriteImage(img, str(tmp_path / "scan.mhd"))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = subprocess.run([str(MEDLENS), "nodules", "detect", str(tmp_path / "scan.mhd"), "--out", str(tmp_path / "out"),
                        "--bootstrap", "0"], capture_output=True, text=True, timeout=300, preexec_fn=cap)
    one_line_error(r, "scan.mhd", "voxel spacing (2.5, 0.0001, 0.0001) mm", "0.1-20 mm")
    assert not (tmp_path / "out").exists()
    img.SetSpacing((0.7, 0.7, 2.5))
    from medlens.imaging.nodules import check_ct_spacing

    check_ct_spacing(load_sitk_image(img, tmp_path))  # a CT's spacing passes


def load_sitk_image(img, tmp_path: Path):
    sitk.WriteImage(img, str(tmp_path / "fine.mhd"))
    return load(tmp_path / "fine.mhd")


# ------------------------------------------------------------------------------------------------ FROC


def _synthetic_luna(n_rows: int, n_scans: int, seed: int = 0):
    """Candidates (probabilities rounded to 3 decimals: many ties), nodules and excluded findings."""
    rng = np.random.default_rng(seed)
    uids = [f"1.2.826.0.1.{i}" for i in range(n_scans)]
    scan = rng.integers(0, n_scans, n_rows)
    xyz = rng.uniform(-100, 100, (n_rows, 3))
    cands = pd.DataFrame({"seriesuid": np.asarray(uids)[scan], "coordX": xyz[:, 0], "coordY": xyz[:, 1],
                          "coordZ": xyz[:, 2], "probability": rng.random(n_rows).round(3)})
    nod_scan = rng.integers(0, n_scans - 5, 2 * n_scans // 3)  # the last scans have no nodule
    nxyz = rng.uniform(-90, 90, (len(nod_scan), 3))
    ann = pd.DataFrame({"seriesuid": np.asarray(uids)[nod_scan], "coordX": nxyz[:, 0], "coordY": nxyz[:, 1],
                        "coordZ": nxyz[:, 2], "diameter_mm": rng.uniform(4, 30, len(nod_scan))})
    hits = ann.sample(frac=0.7, random_state=seed).assign(probability=lambda d: rng.random(len(d)).round(3))
    cands = pd.concat([cands, hits.drop(columns="diameter_mm")], ignore_index=True)
    exc = pd.DataFrame({"seriesuid": np.asarray(uids)[rng.integers(0, n_scans, n_scans)],
                        "coordX": rng.uniform(-90, 90, n_scans), "coordY": rng.uniform(-90, 90, n_scans),
                        "coordZ": rng.uniform(-90, 90, n_scans), "diameter_mm": -1.0})
    return cands, ann, exc, uids


def test_upper_curve_is_the_highest_sensitivity_at_each_fp_rate():
    from medlens.evaluation.froc import sensitivity_at

    rng = np.random.default_rng(3)
    for _ in range(20):
        fps = np.sort(rng.integers(0, 12, 40)) / 4
        sens = np.sort(rng.integers(0, 9, 40)) / 8
        xs = np.unique(fps)
        ys = np.array([sens[fps == x].max() for x in xs])  # the former formula, quadratic in the curve's length
        assert np.array_equal(sensitivity_at(fps, sens), np.interp(np.asarray([.125, .25, .5, 1, 2, 4, 8]), xs, ys))


def test_vectorised_froc_bootstrap_equals_the_loop_over_resamples():
    from medlens.evaluation.froc import _bootstrap, _cpm_of, froc
    from medlens.evaluation.metrics import bootstrap_ci

    cands, ann, exc, uids = _synthetic_luna(50_000, 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res = froc(cands, ann, exc, scans=uids + ["1.2.826.0.9"], n_boot=0)  # one scan without candidates
    scans = res.scans
    assert len(scans) == 151 and 0 < res.cpm < 1
    for seed, n_boot in ((7, 150), (8, 40)):
        ref = bootstrap_ci(lambda idx: _cpm_of([scans[i] for i in idx]), len(scans), n_boot, seed=seed)
        got = _bootstrap(scans, n_boot, seed, chunk_elements=1 << 20)  # several chunks
        assert set(got) == set(ref)
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    # a handful of false positives: the pooled counts stay below 8 FPs per scan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        tiny = froc(cands.iloc[:9], ann, exc, n_boot=0).scans
    assert 1 < len(tiny) < 10 and sum(len(s.fp_scores) for s in tiny) < 8 * len(tiny)
    ref = bootstrap_ci(lambda idx: _cpm_of([tiny[i] for i in idx]), len(tiny), 100, seed=2)
    got = _bootstrap(tiny, 100, 2)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k
    # resamples without any nodule (sensitivity undefined) are dropped by both
    few = [s for s in scans if len(s.nodule_scores) == 0][:3] + [next(s for s in scans if len(s.nodule_scores))]
    ref = bootstrap_ci(lambda idx: _cpm_of([few[i] for i in idx]), len(few), 60, seed=1)
    got = _bootstrap(few, 60, 1)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k


def test_froc_with_1000_bootstraps_is_fast_and_reports_progress(tmp_path):
    from medlens.evaluation.froc import froc

    cands, ann, exc, _ = _synthetic_luna(50_000, 300, seed=1)
    calls = []
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedlensWarning)
        res = froc(cands, ann, exc, n_boot=1000, seed=0, progress=lambda d, n, what: calls.append((what, d, n)))
    seconds = time.time() - t0
    # before: about 4 minutes for this size (a Python loop over resamples, a quadratic curve per resample)
    assert seconds < 30, seconds
    lo, hi = res.ci["cpm"]
    assert lo < res.cpm < hi
    assert calls[-1] == ("bootstrap", 1000, 1000) and ("scans", res.n_scans, res.n_scans) in calls
    done = [d for what, d, _ in calls if what == "bootstrap"]
    assert len(done) > 1 and done == sorted(done)
    # the command line: the figures, per-scan columns only for a handful of scans (the rest in --json)
    cands.to_csv(tmp_path / "c.csv", index=False)
    ann.to_csv(tmp_path / "a.csv", index=False)
    r = medlens("nodules", "froc", tmp_path / "c.csv", tmp_path / "a.csv", "--bootstrap", "50",
                "--json", tmp_path / "f.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "per-scan counts of the 300 scans: --json" in r.stdout
    assert len(json.loads((tmp_path / "f.json").read_text())["operating_points"][0]["fps"]) == 300
