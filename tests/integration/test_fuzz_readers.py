"""Fuzz the DICOM and NIfTI readers with mutated real files: only the project's own error may escape."""

from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings, strategies as st

from medlens.errors import MedlensError
from medlens.io import load

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
