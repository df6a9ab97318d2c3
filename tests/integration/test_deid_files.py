"""Issue 26: ``medlens deid`` on PNG, JPEG and NIfTI (it refused them as "not DICOM").

Real files from the shared data (a CHASE_DB1 fundus JPEG and vessel-mask PNG, a brain MR volume) carry
planted identifiers in every metadata place their format has: PNG text chunks (tEXt, iTXt, zTXt) and EXIF
(eXIf); JPEG EXIF (APP1), XMP (APP1), a comment (COM) and a JFIF thumbnail; the NIfTI header's description
fields (descrip, aux_file, intent_name, db_name) and a header extension. After ``deid`` no identifier is left
in any byte of the output (gzip included), the file names are gone, and the pixels are equal to the input's.
"""

from __future__ import annotations

import csv
import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
from nibabel.arrayproxy import ArrayProxy
from nibabel.nifti1 import Nifti1Extension
import numpy as np
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngImageFile

from medlens.io import load
from tests.clirun import medlens

PHI = b"DOE^JANE 1957-03-14 MRN 00123456"
PHI_MARKS = (b"DOE^JANE", b"00123456", b"1957-03-14")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_with_phi(src: Path) -> bytes:
    data = src.read_bytes()
    ihdr_end = 8 + 12 + int.from_bytes(data[8:12], "big")
    planted = (_chunk(b"tEXt", b"Patient\x00" + PHI)
               + _chunk(b"iTXt", b"Comment\x00\x00\x00en\x00Kommentar\x00" + PHI)
               + _chunk(b"zTXt", b"Author\x00\x00" + zlib.compress(PHI))
               + _chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08" + PHI))
    return data[:ihdr_end] + planted + data[ihdr_end:] + b"trailing " + PHI


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _jpeg_with_phi(src: Path) -> bytes:
    data = src.read_bytes()
    assert data[:2] == b"\xff\xd8"
    jfif = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x01\x01" + PHI[:3]  # a 1x1 thumbnail (3 bytes of RGB)
    planted = (_segment(0xE0, jfif) + _segment(0xE1, b"Exif\x00\x00MM\x00*" + PHI)
               + _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>" + PHI + b"</x:xmpmeta>")
               + _segment(0xFE, PHI))
    return data[:2] + planted + data[2:] + PHI


def _nifti_with_phi(data_root: Path) -> nib.Nifti1Image:
    img = load(data_root / "mri-seg" / "brain1_image.nrrd")
    nii = nib.Nifti1Image(np.ascontiguousarray(img.array.transpose(2, 1, 0)).astype(np.int16), np.eye(4))
    hdr = nii.header
    hdr["descrip"] = PHI
    hdr["aux_file"] = b"DOE^JANE.nii"
    hdr["intent_name"] = b"MRN 00123456"
    hdr["db_name"] = b"1957-03-14"
    hdr.set_slope_inter(0.5, 10.0)
    hdr.extensions.append(Nifti1Extension(6, b"scanned for " + PHI))
    return nii


def _nii(path: Path) -> tuple[nib.Nifti1Image, ArrayProxy]:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image) and isinstance(img.dataobj, ArrayProxy)
    return img, img.dataobj


def _no_phi(blob: bytes) -> bool:
    return not any(m in blob for m in PHI_MARKS)


def test_deid_strips_png_jpeg_and_nifti_metadata_and_keeps_the_pixels(data_root, tmp_path):
    chase = data_root / "chasedb1" / "CHASEDB1"
    src_jpg = sorted(chase.glob("*.jpg"))[0]
    src_png = sorted(chase.glob("*_1stHO.png"))[0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "DOE_JANE_fundus.jpg").write_bytes(_jpeg_with_phi(src_jpg))
    (inp / "DOE_JANE_mask.png").write_bytes(_png_with_phi(src_png))
    nii = _nifti_with_phi(data_root)
    nib.save(nii, inp / "DOE_JANE_t1.nii.gz")
    nib.save(nii, inp / "DOE_JANE_t1.nii")
    for p in inp.iterdir():  # the identifiers are really there before
        blob = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        assert not _no_phi(blob), p.name

    r = medlens("deid", inp, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "4 files" in r.stdout and PHI.decode() not in r.stdout + r.stderr
    outs = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "deid_log.csv")
    assert len(outs) == 4 and all("DOE" not in str(p) for p in outs)
    by_suffix = {"".join(p.suffixes): p for p in outs}
    assert set(by_suffix) == {".jpg", ".png", ".nii", ".nii.gz"}
    for p in outs:
        blob = p.read_bytes()
        assert _no_phi(blob), p.name
        if p.name.endswith(".gz"):
            assert _no_phi(gzip.decompress(blob)), p.name

    # pixels: decoded arrays equal to the input's
    with PILImage.open(src_jpg) as a, PILImage.open(by_suffix[".jpg"]) as b:
        assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
        assert not b.info.get("exif") and "comment" not in b.info
    with PILImage.open(src_png) as a, PILImage.open(by_suffix[".png"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert isinstance(b, PngImageFile) and not b.text and not b.info.get("exif")
    for suffix in (".nii", ".nii.gz"):
        out, out_raw = _nii(by_suffix[suffix])
        h = out.header
        assert all(bytes(h[f]).strip(b"\x00") == b"" for f in ("descrip", "aux_file", "intent_name", "db_name"))
        assert len(h.extensions) == 0
        before, before_raw = _nii(inp / f"DOE_JANE_t1{suffix}")
        assert (before_raw.slope, before_raw.inter) == (0.5, 10.0)  # a scaled int16 volume
        assert (out_raw.slope, out_raw.inter) == (0.5, 10.0) and h.get_data_dtype() == np.int16
        assert np.array_equal(out_raw.get_unscaled(), before_raw.get_unscaled())  # raw voxels
        assert np.array_equal(out.get_fdata(), before.get_fdata()) and np.array_equal(np.asarray(out.affine), np.asarray(before.affine))

    rows = list(csv.DictReader((tmp_path / "out" / "deid_log.csv").open()))
    counts = {r["action"]: r["detail"] for r in rows if r["action"].startswith("files")}
    assert counts == {"files in": "4", "files out": "4", "files skipped": "0"}
    removed = {r["attribute"] for r in rows if r["action"] in ("removed", "emptied")}
    assert {"PNG tEXt chunk", "PNG iTXt chunk", "PNG zTXt chunk", "PNG eXIf chunk", "JPEG COM (comment) segment",
            "JPEG APP1 (EXIF/XMP) segment", "JFIF thumbnail", "NIfTI descrip", "NIfTI aux_file",
            "NIfTI intent_name", "NIfTI db_name", "NIfTI extension (code 6)"} <= removed
    assert all(_no_phi(",".join(r.values()).encode()) for r in rows)  # values are logged only with --log-values


def test_a_broken_png_is_skipped_with_a_reason_and_nothing_of_it_written(data_root, tmp_path):
    src_png = sorted((data_root / "chasedb1" / "CHASEDB1").glob("*_1stHO.png"))[0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "ok.png").write_bytes(src_png.read_bytes())
    (inp / "cut.png").write_bytes(src_png.read_bytes()[:100])
    r = medlens("deid", inp, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "1 files" in r.stdout and "could not be de-identified as PNG" in r.stdout
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1
