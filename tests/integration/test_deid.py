"""De-identification (PS3.15 basic profile) on the real LIDC series and on a dataset filled with every listed attribute."""

import csv
import datetime as dt

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset

from medlens.io.deid import Deidentifier, deidentify_folder, profile_actions

VALUE_FOR_VR = {"DA": "20240115", "DT": "20240115101010", "TM": "101010", "DS": "12.5", "IS": "42", "AS": "045Y",
                "UI": "1.2.826.0.1.3680043.8.498.12345", "FD": 3.5, "FL": 2.5, "SS": -7, "US": 7, "SL": -70,
                "UL": 70, "SV": 9, "UV": 9, "OB": b"secret!!", "OW": b"secret!!", "UN": b"secret!!",
                "UR": "http://hospital.example/patient/123", "AT": 0x00100010}


def _filled_dataset():
    """A dataset holding every single-tag attribute of Table E.1-1 with a distinctive value."""
    ds = Dataset()
    originals = {}
    for tag, action in profile_actions().items():
        if len(tag) != 2 or tag[0] == 0x0002:
            continue
        t = (tag[0] << 16) | tag[1]
        try:
            vr = dictionary_VR(t)
        except KeyError:
            continue
        vr = vr.split(" or ")[0]
        if vr == "SQ":
            item = Dataset()
            item.PatientName = "Secret^Nested"
            ds.add_new(t, "SQ", [item])
            originals[t] = "SQ"
            continue
        value = VALUE_FOR_VR.get(vr, f"SECRET-{keyword_for_tag(t) or t:}"[:16])
        ds.add_new(t, vr, value)
        originals[t] = ds[t].value
    ds.add_new(0x00091010, "LO", "private secret")  # a private tag
    ds.PixelData = b"\x01\x02" * 8
    return ds, originals


def test_no_listed_attribute_keeps_its_value():
    ds, originals = _filled_dataset()
    assert len(originals) > 400  # the whole table, not a sample
    Deidentifier(key="k").dataset(ds)
    kept = []
    for t, old in originals.items():
        if t not in ds:
            continue
        new = ds[t].value
        if old == "SQ":
            if any("PatientName" in item and item.PatientName == "Secret^Nested" for item in new or []):
                kept.append(keyword_for_tag(t))
        elif new not in (None, "", b"", []) and new == old:
            kept.append(keyword_for_tag(t) or hex(t))
    assert not kept, f"attributes that kept their original value: {kept}"
    assert 0x00091010 not in ds  # private tags removed
    assert ds.PixelData == b"\x01\x02" * 8 and ds.PatientIdentityRemoved == "YES"


def test_date_shift_keeps_intervals():
    ds = Dataset()
    ds.StudyDate, ds.AcquisitionDate = "20240115", "20240120"
    Deidentifier(key="k", date_shift_days=-100).dataset(ds)
    d = lambda s: dt.datetime.strptime(s, "%Y%m%d")  # noqa: E731
    assert (d(ds.AcquisitionDate) - d(ds.StudyDate)).days == 5
    assert ds.StudyDate == (d("20240115") - dt.timedelta(days=100)).strftime("%Y%m%d")


@pytest.fixture(scope="module")
def deid_lidc(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("deid") / "out"
    rep = deidentify_folder(data_root / "lidc-idri-0001", out, key="study-key")
    return rep, out


def test_lidc_deid_real_series(deid_lidc, data_root):
    rep, out = deid_lidc
    assert rep.files == 133 and sorted(rep.skipped) == ["069.xml", "ATTRIBUTION", "MD5SUMS.txt"]
    src = {pydicom.dcmread(f).SOPInstanceUID: f for f in (data_root / "lidc-idri-0001").rglob("*.dcm")}
    orig0 = pydicom.dcmread(next(iter(src.values())))
    outs = sorted(out.rglob("*.dcm"))
    assert len(outs) == 133
    studies, series, frames = set(), set(), set()
    by_new = {}
    for f in outs:
        ds = pydicom.dcmread(f)
        studies.add(ds.StudyInstanceUID); series.add(ds.SeriesInstanceUID); frames.add(ds.FrameOfReferenceUID)
        assert str(orig0.PatientID) and str(ds.get("PatientID", "")) != str(orig0.PatientID)
        assert not [e for e in ds if e.tag.is_private]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        by_new[ds.SOPInstanceUID] = ds
    # UIDs remapped consistently across the study, and differ from the originals
    assert len(studies) == len(series) == len(frames) == 1
    assert studies.pop() != orig0.StudyInstanceUID and series.pop() != orig0.SeriesInstanceUID
    # pixel data bit-identical, matched through the deterministic UID map
    d = Deidentifier(key="study-key")
    for old_uid, f in list(src.items())[:20]:
        assert by_new[d.new_uid(old_uid)].PixelData == pydicom.dcmread(f).PixelData
    # the output still loads as the same volume
    from medlens.io.dicom import read_dicom_series

    assert np.array_equal(read_dicom_series(out).array, read_dicom_series(data_root / "lidc-idri-0001").array)


def test_deid_log_has_no_old_values(deid_lidc, data_root):
    rep, out = deid_lidc
    text = rep.log_path.read_text()
    orig = pydicom.dcmread(next((data_root / "lidc-idri-0001").rglob("*.dcm")))
    for secret in (str(orig.PatientID), str(orig.StudyInstanceUID), str(orig.SOPInstanceUID)):
        assert secret not in text
    rows = list(csv.DictReader(rep.log_path.open()))
    assert {"removed", "uid remapped"} <= {r["action"] for r in rows}
    per_file = [r for r in rows if r["file"]]
    assert per_file and all(r["burned_in_annotation_flag"] == "YES" for r in per_file)  # LIDC has no BurnedInAnnotation = NO
    counts = {r["action"]: int(r["detail"]) for r in rows if r["action"].startswith("files ")}
    assert counts == {"files in": 136, "files out": 133, "files skipped": 3}
    assert sum(r["action"] == "written" for r in rows) == 133 and sum(r["action"] == "skipped" for r in rows) == 3
    # no identifier in the output paths either
    assert not any(str(orig.PatientID) in str(p) for p in out.rglob("*"))
