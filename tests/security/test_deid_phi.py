"""De-identification leaves nothing behind (issue 11, parts 4 and 7), through the real ``medlens deid`` CLI.

A real LIDC CT slice is filled with distinctive PHI strings in every place PS3.15 names (preamble,
file meta, private tags in and out of sequences, SR content, overlays, curves,
OriginalAttributesSequence, every attribute of Table E.1-1, every Person Name of the data
dictionary), de-identified, and every output byte is searched for every one of those strings.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

NUMERIC_VALUES = {"DS": "12.5", "IS": "42", "AS": "045Y", "TM": "101010", "FD": 3.5, "FL": 2.5, "SS": -7, "US": 7,
                  "SL": -70, "UL": 70, "SV": 9, "UV": 9, "AT": 0x00100010}
BYTE_VRS = ("OB", "OW", "UN", "OD", "OF", "OL", "OV")


def medlens(*args, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "medlens.cli.main", *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ))
    if check and r.returncode != 0:
        raise AssertionError(f"medlens {args} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def _ct_slice(data_root: Path) -> Path:
    return sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[0]


class Phi:
    """Hands out distinctive values and remembers every string that must not survive."""

    def __init__(self) -> None:
        self.n = 0
        self.secrets: list[str] = []

    def text(self) -> str:
        self.n += 1
        s = f"QX{self.n:05d}QX"  # 9 characters: fits SH, AE and CS
        self.secrets.append(s)
        return s

    def date(self) -> str:
        self.n += 1
        s = (dt.date(1931, 1, 1) + dt.timedelta(days=self.n)).strftime("%Y%m%d")
        self.secrets.append(s)
        return s

    def uid(self) -> str:
        self.n += 1
        s = f"1.2.826.0.1.3680043.8.498.{770000000 + self.n}"
        self.secrets.append(s)
        return s

    def value(self, vr: str):
        if vr == "PN":
            return f"{self.text()}^{self.text()}"
        if vr == "DA":
            return self.date()
        if vr == "DT":
            return self.date() + "101010"
        if vr == "UI":
            return self.uid()
        if vr == "UR":
            return f"http://phi.example/{self.text()}"
        if vr in BYTE_VRS:
            return (self.text() + "B").encode()
        if vr in NUMERIC_VALUES:
            return NUMERIC_VALUES[vr]
        return self.text()  # LO, SH, ST, LT, UT, UC, CS, AE

    def item(self, private_group: int) -> Dataset:
        """A sequence item with a name and a private block, all distinctive."""
        item = Dataset()
        item.PatientName = self.value("PN")
        block = item.private_block(private_group, self.text(), create=True)
        block.add_new(0x01, "LO", self.text())
        return item


def _listed_and_named_tags() -> dict[int, str]:
    """Every single-tag attribute of Table E.1-1 plus every Person Name of the data dictionary: {tag: VR}."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector("dicomfields_2026c")["ALL_TAGS"]
    tags = {(t[0] << 16) | t[1] for t in table if len(t) == 2}
    tags |= {t for t, entry in DicomDictionary.items() if entry[0] == "PN"}
    out = {}
    for t in sorted(tags):
        if t >> 16 in (0x0000, 0x0002) or t == 0x7FE00010:
            continue
        try:
            out[t] = dictionary_VR(t).split(" or ")[0]
        except KeyError:
            continue
    return out


def _fill(ds: Dataset, phi: Phi, private_group: int) -> None:
    for t, vr in _listed_and_named_tags().items():
        if vr == "SQ":
            ds.add_new(t, "SQ", [phi.item(private_group)])
        else:
            ds.add_new(t, vr, phi.value(vr))


def _sr_content(phi: Phi) -> list[Dataset]:
    def item(value_type: str, **values) -> Dataset:
        it = Dataset()
        it.RelationshipType, it.ValueType = "CONTAINS", value_type
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", "Finding"
        it.ConceptNameCodeSequence = [code]
        for k, v in values.items():
            setattr(it, k, v)
        return it

    text = item("TEXT", TextValue=f"Patient {phi.text()} seen by Dr {phi.text()}")
    text.private_block(0x0013, phi.text(), create=True).add_new(0x01, "LO", phi.text())
    nested = item("CONTAINER", ContinuityOfContent="SEPARATE",
                  ContentSequence=[item("TEXT", TextValue=phi.text()), item("PNAME", PersonName=phi.value("PN"))])
    return [text, item("PNAME", PersonName=phi.value("PN")), item("DATE", Date=phi.date()),
            item("DATETIME", DateTime=phi.value("DT")), item("UIDREF", UID=phi.uid()), nested]


def _overlay_and_curve(ds: Dataset, phi: Phi) -> None:
    for g in (0x6000, 0x6002):
        ds.add_new((g, 0x0010), "US", 512)
        ds.add_new((g, 0x0011), "US", 512)
        ds.add_new((g, 0x0022), "LO", phi.text())  # Overlay Description
        ds.add_new((g, 0x0040), "CS", "G")
        ds.add_new((g, 0x0050), "SS", [1, 1])
        ds.add_new((g, 0x0100), "US", 1)
        ds.add_new((g, 0x0102), "US", 0)
        ds.add_new((g, 0x1500), "LO", phi.text())  # Overlay Label
        ds.add_new((g, 0x3000), "OW", (phi.text() + "B").encode() * 3277 + b"\0\0")  # 32768 bytes
        ds.add_new((g, 0x4000), "LT", phi.text())  # Overlay Comments
    for g in (0x5000, 0x5002):
        ds.add_new((g, 0x0005), "US", 1)
        ds.add_new((g, 0x0010), "US", 4)
        ds.add_new((g, 0x0020), "CS", "TAC")
        ds.add_new((g, 0x0022), "LO", phi.text())  # Curve Description
        ds.add_new((g, 0x2500), "LO", phi.text())  # Curve Label
        ds.add_new((g, 0x3000), "OB", (phi.text() + "B").encode())  # Curve Data


def _original_attributes(phi: Phi) -> list[Dataset]:
    modified = Dataset()
    modified.PatientName, modified.PatientID = phi.value("PN"), phi.text()
    item = Dataset()
    item.ModifiedAttributesSequence = [modified]
    item.AttributeModificationDateTime = phi.value("DT")
    item.ModifyingSystem, item.SourceOfPreviousValues = phi.text(), phi.text()
    item.ReasonForTheAttributeModification = "COERCE"
    return [item]


def _file_meta(phi: Phi, ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = phi.uid()
    meta.ImplementationVersionName = phi.text()
    meta.SourceApplicationEntityTitle = phi.text()
    meta.SendingApplicationEntityTitle = phi.text()
    meta.ReceivingApplicationEntityTitle = phi.text()
    meta.SourcePresentationAddress = f"http://phi.example/{phi.text()}"
    meta.SendingPresentationAddress = f"http://phi.example/{phi.text()}"
    meta.ReceivingPresentationAddress = f"http://phi.example/{phi.text()}"
    meta.PrivateInformationCreatorUID = phi.uid()
    meta.PrivateInformation = (phi.text() + "B").encode()
    return meta


def build_phi_ct(data_root: Path, in_dir: Path) -> tuple[Path, list[str]]:
    """Write the PHI-rich CT under ``in_dir``; return its path and every distinctive string in it."""
    phi = Phi()
    ds = pydicom.dcmread(_ct_slice(data_root))
    ds.remove_private_tags()
    _fill(ds, phi, 0x0009)
    top = ds.private_block(0x0011, phi.text(), create=True)
    top.add_new(0x01, "LO", phi.text())
    top.add_new(0x02, "SQ", [phi.item(0x0015)])  # a private sequence holding PHI and a private tag
    nested = Dataset()  # every listed attribute again, inside a sequence the table does not list
    _fill(nested, phi, 0x0017)
    ds.ReferencedSeriesSequence = [nested]
    ds.ContentSequence.extend(_sr_content(phi))  # after the item _fill put there
    _overlay_and_curve(ds, phi)
    ds.OriginalAttributesSequence.extend(_original_attributes(phi))
    ds.file_meta = _file_meta(phi, ds)
    ds.preamble = f"PREAMBLE {phi.text()} {phi.text()}".encode().ljust(128, b"*")
    folder = in_dir / phi.text()  # identifying folder and file names too
    folder.mkdir(parents=True)
    path = folder / f"{phi.text()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, phi.secrets


def _log_counts(out: Path) -> dict[str, int]:
    rows = list(csv.DictReader((out / "deid_log.csv").open()))
    return {r["action"]: int(r["detail"]) for r in rows if r["action"] in ("files in", "files out", "files skipped")}


def _dicom_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != "deid_log.csv")


def test_phi_rich_ct_leaves_no_distinctive_string_in_any_output_byte(data_root, tmp_path):
    src, secrets = build_phi_ct(data_root, tmp_path / "in")
    raw_in = src.read_bytes() + str(src).encode()
    assert len(secrets) > 1000 and all(s.encode() in raw_in for s in secrets)  # the PHI really is in the input
    r = medlens("deid", tmp_path / "in", tmp_path / "out", "--key", "test-key", check=True)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 2 and (tmp_path / "out" / "deid_log.csv") in written
    blobs = {p: p.read_bytes() + str(p.relative_to(tmp_path)).encode() for p in written}
    blobs["stdout+stderr"] = (r.stdout + r.stderr).encode()
    left = sorted({(s, str(where)[-40:]) for where, b in blobs.items() for s in secrets if s.encode() in b})
    assert not left, f"{len(left)} distinctive PHI strings survived, e.g. {left[:10]}"
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # nothing hidden left beside the output
    out = pydicom.dcmread(_dicom_outputs(tmp_path / "out")[0])
    raw = _dicom_outputs(tmp_path / "out")[0].read_bytes()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
    assert sorted(e.keyword for e in out.file_meta if e.tag.element) == sorted([
        "FileMetaInformationVersion", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID",
        "ImplementationClassUID", "ImplementationVersionName"])
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert not [e for e in out.iterall() if e.tag.is_private or e.tag.group in range(0x5000, 0x6100)]
    assert "OriginalAttributesSequence" not in out and out.PatientIdentityRemoved == "YES"
    assert out.PixelData == pydicom.dcmread(src).PixelData  # pixels bit-identical
    assert _log_counts(tmp_path / "out") == {"files in": 1, "files out": 1, "files skipped": 0}


def _date_shift_ct(data_root: Path, path: Path) -> Dataset:
    ds = pydicom.dcmread(_ct_slice(data_root))
    ds.PatientBirthDate = "19500310"  # Z: emptied
    ds.LastMenstrualDate = "20000105"  # X: removed
    ds.DateOfSecondaryCapture = "20000106"  # X: removed
    ds.StudyDate, ds.AcquisitionDate = "20000110", "20000111"  # the option's study time line: shifted
    ds.SeriesDate, ds.ContentDate, ds.InstanceCreationDate = "20000112", "20000113", "20000114"  # X/D, Z/D: shifted
    ds.AcquisitionDateTime = "20000111093015.5"  # X/Z/D: shifted, time kept
    item = Dataset()
    item.RelationshipType, item.ValueType, item.Date = "CONTAINS", "DATE", "20000115"  # D inside SR content
    ds.ContentSequence = [item]
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_date_shift_obeys_profile_actions(data_root, tmp_path):
    _date_shift_ct(data_root, tmp_path / "in" / "ct.dcm")
    medlens("deid", tmp_path / "in", tmp_path / "out", "--date-shift", "-100", check=True)
    out = pydicom.dcmread(_dicom_outputs(tmp_path / "out")[0])

    def shifted(d: str) -> str:
        return (dt.datetime.strptime(d, "%Y%m%d") - dt.timedelta(days=100)).strftime("%Y%m%d")

    assert "PatientBirthDate" in out and out.PatientBirthDate == ""
    assert "LastMenstrualDate" not in out and "DateOfSecondaryCapture" not in out
    assert out.StudyDate == shifted("20000110") and out.AcquisitionDate == shifted("20000111")
    assert (out.SeriesDate, out.ContentDate, out.InstanceCreationDate) == (
        shifted("20000112"), shifted("20000113"), shifted("20000114"))
    assert out.AcquisitionDateTime == shifted("20000111") + "093015.5"
    assert out.ContentSequence[0].Date == shifted("20000115")
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"


def test_inputs_sharing_a_sop_instance_uid_all_come_out(data_root, tmp_path):
    ds = pydicom.dcmread(_ct_slice(data_root))
    pixels = []
    for i, sub in enumerate(("a", "b", "c")):
        arr = ds.pixel_array.copy()
        arr[0, 0] = 1000 + i  # same SOP Instance UID, different images
        ds.PixelData = arr.tobytes()
        pixels.append(ds.PixelData)
        (tmp_path / "in" / sub).mkdir(parents=True)
        ds.save_as(tmp_path / "in" / sub / "slice.dcm", enforce_file_format=True)
    r = medlens("deid", tmp_path / "in", tmp_path / "out", check=True)
    outs = _dicom_outputs(tmp_path / "out")
    assert len(outs) == 3 and "3 files" in r.stdout
    assert sorted(pydicom.dcmread(p).PixelData for p in outs) == sorted(pixels)
    assert _log_counts(tmp_path / "out") == {"files in": 3, "files out": 3, "files skipped": 0}


def test_file_without_preamble_is_deidentified(data_root, tmp_path):
    ds = pydicom.dcmread(_ct_slice(data_root))
    bare = Dataset(ds)  # no preamble, no 'DICM', no file meta: a bare data set
    (tmp_path / "in").mkdir()
    bare.save_as(tmp_path / "in" / "bare", implicit_vr=True, little_endian=True)
    (tmp_path / "in" / "notes.txt").write_text("not an image\n" * 20)
    assert (tmp_path / "in" / "bare").read_bytes()[128:132] != b"DICM"
    r = medlens("deid", tmp_path / "in", tmp_path / "out", check=True)
    outs = _dicom_outputs(tmp_path / "out")
    assert len(outs) == 1 and "1 files" in r.stdout
    out = pydicom.dcmread(outs[0])
    assert outs[0].read_bytes()[:132] == b"\0" * 128 + b"DICM"
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert str(ds.PatientID) and out.PatientID != ds.PatientID and out.PatientName == ""
    assert out.PixelData == ds.PixelData
    assert np.array_equal(out.pixel_array, ds.pixel_array)
    assert _log_counts(tmp_path / "out") == {"files in": 2, "files out": 1, "files skipped": 1}
    skipped = [r for r in csv.DictReader((tmp_path / "out" / "deid_log.csv").open()) if r["action"] == "skipped"]
    assert len(skipped) == 1 and "not DICOM" in skipped[0]["detail"]


def test_non_empty_destination_is_refused_and_nothing_written(data_root, tmp_path):
    (tmp_path / "in").mkdir()
    pydicom.dcmread(_ct_slice(data_root)).save_as(tmp_path / "in" / "ct.dcm", enforce_file_format=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier_series.dcm").write_bytes(b"an earlier run")
    r = medlens("deid", tmp_path / "in", tmp_path / "out")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr
    assert "not empty" in lines[0] and str(tmp_path / "out") in lines[0]
    assert os.listdir(tmp_path / "out") == ["earlier_series.dcm"]
    assert (tmp_path / "out" / "earlier_series.dcm").read_bytes() == b"an earlier run"
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no temp folder or file beside it


def test_killed_run_leaves_no_output_and_a_rerun_completes(data_root, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / "anon"
    cmd = [sys.executable, "-m", "medlens.cli.main", "deid", str(data_root / "lidc-idri-0001"), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while sum(1 for _ in dest.rglob("*.dcm")) < 5:  # some files written, far from all 133
            assert proc.poll() is None and time.monotonic() < deadline, "deid ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()  # a partial run never looks like an output folder
    r = medlens("deid", data_root / "lidc-idri-0001", out, check=True)
    assert "133 files" in r.stdout and len(_dicom_outputs(out)) == 133
    assert os.listdir(dest) == ["anon"]  # the killed run's temp folder is gone too
    assert _log_counts(out) == {"files in": 136, "files out": 133, "files skipped": 3}


def test_failure_mid_way_leaves_nothing(data_root, tmp_path):
    from medlens.io.deid import deidentify_folder

    def progress(done, total):
        if done == 60:  # an error after 59 files were written
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        deidentify_folder(data_root / "lidc-idri-0001", tmp_path / "out", progress=progress)
    assert os.listdir(tmp_path) == []
