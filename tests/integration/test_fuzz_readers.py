"""Fuzz the readers with mutated real files, header bombs, NaN/inf values and non-UTF-8 names: only the
project's own error may escape, and nothing loads as something it is not."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from medlens.errors import DataError, MedlensError
from medlens.io import load
from medlens.io.limits import max_pixels

CT_SMALL = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()


def _nifti_bytes() -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), np.diag([0.8, 0.8, 2.0, 1.0]))
    return img.header.binaryblock + b"\0" * 4 + np.asarray(img.dataobj).astype(np.int16).tobytes(order="F")


NIFTI = _nifti_bytes()


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut]) if cut else bytes(b)


def check_load(path: Path) -> str:
    try:
        load(path)
        return "ok"
    except MedlensError:
        return "refused"


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, cut=st.one_of(st.none(), st.integers(1, len(CT_SMALL))))
def test_fuzz_dicom(tmp_path, edits, cut):
    p = tmp_path / "fuzz.dcm"
    p.write_bytes(mutate(CT_SMALL, edits, cut))
    assert check_load(p) in ("ok", "refused")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, cut=st.one_of(st.none(), st.integers(1, len(NIFTI))))
def test_fuzz_nifti(tmp_path, edits, cut):
    p = tmp_path / "fuzz.nii"
    p.write_bytes(mutate(NIFTI, [(pos % 352, v) for pos, v in edits], cut))
    assert check_load(p) in ("ok", "refused")


def png_bytes(width: int, height: int, raw: bytes, depth: int = 8, color: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


PNG_PIXELS = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
PNG = png_bytes(48, 40, b"".join(b"\0" + row.tobytes() for row in PNG_PIXELS))
CHANNELS = {0: 1, 2: 3, 6: 4}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, cut=st.one_of(st.none(), st.integers(1, len(PNG))))
def test_fuzz_png(tmp_path, edits, cut):
    """Mutated or cut PNGs are refused or read exactly: never zero-filled or altered pixels."""
    p = tmp_path / "fuzz.png"
    p.write_bytes(mutate(PNG, edits, cut))
    try:
        arr = load(p).array
    except MedlensError:
        return
    assert np.array_equal(arr, PNG_PIXELS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 1 << 16), height=st.integers(1, 1 << 16), color=st.sampled_from([0, 2, 6]))
def test_fuzz_png_header_claims(tmp_path, width, height, color):
    """A header claiming any size over one row of data: refused by the pixel limit or as short, never decoded."""
    p = tmp_path / "claims.png"
    p.write_bytes(png_bytes(width, height, b"\0" * (1 + width * CHANNELS[color]), color=color))
    if height == 1:
        assert load(p).shape == (1, width)
        return
    with pytest.raises(DataError) as e:
        load(p)
    need = "MEDLENS_MAX_PIXELS" if width * height > max_pixels() else "PNG pixel data ends early"
    assert need in str(e.value) and "claims.png" in str(e.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_bad=st.integers(1, 30), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       suffix=st.sampled_from([".npy", ".nii.gz", ".mhd", ".nrrd", ".tif"]), seed=st.integers(0, 2**16))
def test_fuzz_nonfinite_values(tmp_path, n_bad, value, suffix, seed):
    """Any NaN/inf in any format is refused with the file name and the exact count."""
    from PIL import Image as PILImage

    from medlens.io import Image, save

    rng = np.random.default_rng(seed)
    shape = (30, 40) if suffix == ".tif" else (6, 7, 8)
    a = rng.normal(size=shape).astype(np.float32)
    a.flat[rng.choice(a.size, n_bad, replace=False)] = value
    p = tmp_path / f"bad{suffix}"
    if suffix == ".tif":
        PILImage.fromarray(a, mode="F").save(p)
    else:
        save(Image(a), p)
    with pytest.raises(DataError) as e:
        load(p)
    assert f"bad{suffix}: {n_bad} of {a.size:,} values are NaN or infinite" in str(e.value)


_NAMES_CHILD = r"""
import json, os, random, sys
import numpy as np
from medlens.errors import MedlensError
from medlens.io import Image, load, save
folder, n = os.fsencode(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
img = Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
out = {"written": 0, "refused": 0, "read_back": 0}
for i in range(n):
    stem = bytes(rng.choice([rng.randrange(0x80, 0x100), rng.randrange(0x30, 0x7b)]) for _ in range(rng.randrange(1, 6)))
    suffix = rng.choice([b".nii.gz", b".nii", b".mhd", b".nrrd", b".png", b".npy"])
    path = os.fsdecode(folder + b"/" + b"%d_" % i + stem.replace(b"/", b"_") + suffix)
    try:
        save(img if not suffix == b".png" else Image(np.arange(20, dtype=np.uint8).reshape(4, 5)), path)
        out["written"] += 1
    except MedlensError as e:
        assert "not valid UTF-8" in str(e), e
        out["refused"] += 1
        continue
    try:
        load(path)
        out["read_back"] += 1
    except MedlensError as e:
        assert "not valid UTF-8" in str(e), e
        out["refused"] += 1
print(json.dumps(out))
"""


def test_fuzz_non_utf8_names(tmp_path):
    """Random byte names for every writer and reader: written and read, or refused in one line; SimpleITK
    never sees an invalid name (it would abort the process: the child runs them all)."""
    n = 120
    r = subprocess.run([sys.executable, "-c", _NAMES_CHILD, str(tmp_path), str(n)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["written"] + out["refused"] >= n and out["refused"] > 10 and out["read_back"] > 10, out
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind
