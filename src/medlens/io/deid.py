"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The attribute list and each attribute's action (Table E.1-1) come from the maintained
``dicom-anonymizer`` package's database of the current standard edition; medlens applies it:

- ``X`` remove, ``Z`` empty, ``D`` replace with a dummy value of the right VR, ``U`` remap UID;
  combined actions take the strongest (``X/Z/D`` -> remove, ``Z/D`` -> empty, ``X/Z/U*`` -> remap
  UIDs, remove the rest);
- every data set is handled, however deeply nested in sequences; all private tags, group
  lengths, attributes unknown to the data dictionary, whole overlay (60xx) and curve (50xx)
  groups are removed; any other Person Name is replaced;
- sequences whose action is ``D`` (SR Content Sequence, Person Identification Code Sequence,
  Graphic Annotation Sequence, ...) are cleaned item by item: listed attributes by their action,
  every other name, date, time and free text (SR ``TextValue`` included) replaced by a dummy;
  coded entries are kept except where a code identifies a person;
- the 128-byte preamble is zeroed and the file meta (group 0002) is rebuilt from scratch;
- UIDs are remapped deterministically from a key, so every file of a study gets the same new
  Study/Series/FrameOfReference UIDs (and re-running with the same key gives the same UIDs);
- dates can be shifted by a fixed number of days (the "Retain Longitudinal Temporal Information
  with Modified Dates" option): only dates whose action allows a replacement (``D``) and the
  option's study/acquisition dates shift; ``Z`` dates (Patient's Birth Date) are still emptied and
  ``X`` dates (Last Menstrual Date) removed;
- images whose BurnedInAnnotation is not ``NO`` are flagged: their pixels may show identifiers;
- pixel data is never touched (bit-identical), and a CSV log lists what changed per file,
  without the old values unless ``log_values=True``, with the exact count of files in, out and
  skipped (and why);
- a folder is written into a hidden temporary folder beside the destination and renamed into place
  only when complete; a non-empty destination is refused, so two runs never mix;
- PNG, JPEG and NIfTI files beside the DICOM (``io.deid_files``) lose their metadata (text chunks, EXIF,
  comments; the NIfTI header's description fields and extensions) with their pixels copied byte for byte,
  and are written as ``images/<NNNNNN><suffix>`` (the input's position, never its name).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import uid
from pydicom.datadict import get_entry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from medlens.errors import DataError
from medlens.io.deid_files import kind_of, strip_file
from medlens.io.limits import max_decompressed_bytes
from medlens.utils import atomic_dir

PROFILE_DB = "dicomfields_2026c"
METHOD = "PS3.15 E.1 Basic Profile (medlens)"
LOG_NAME = "deid_log.csv"
PIXEL_DATA = 0x7FE00010
IMPLEMENTATION_VERSION = "MEDLENS_DEID"

# Rows medlens adds to Table E.1-1, as data: (group, element[, group mask, element mask]) -> action.
SUPPLEMENT: dict[tuple, str] = {
    (0x0040, 0xA160): "D",  # Text Value: free text of an SR content item
    (0x6000, 0x0000, 0xFF00, 0x0000): "X",  # the whole overlay group: labels, descriptions, bitmaps
}

# Dates the Modified Dates option shifts although their basic action is Z or X (the study's
# time line); every other date shifts only when its action allows a replacement (D).
OPTION_SHIFTED_DATES = frozenset({
    (0x0008, 0x0020),  # Study Date
    (0x0008, 0x0022),  # Acquisition Date
})

# Inside a D sequence, values of these VRs are replaced unless the table says otherwise.
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE", "DA", "DT", "TM"})
# Coded-entry attributes: terminology, kept inside D sequences (SR concept names and codes).
_CODED_ENTRY = frozenset({0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x0008010F,
                          0x00080119, 0x00080120, 0x00080122})
# D sequences whose codes identify a person: nothing in them is kept.
_CODES_ARE_PHI = frozenset({0x00401101})  # Person Identification Code Sequence
_NOT_DICOM = "not DICOM"
_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def profile_actions() -> dict[tuple, str]:
    """Table E.1-1 as ``{tag tuple: action}``; tags of repeating groups are (group, elem, gmask, emask)."""
    db = dicom_anonymization_database_selector(PROFILE_DB)
    out: dict[tuple, str] = {}
    for cat, code in (("X_Z_U_STAR_TAGS", "XZU*"), ("X_Z_D_TAGS", "XZD"), ("X_D_TAGS", "XD"), ("X_Z_TAGS", "XZ"),
                      ("Z_D_TAGS", "ZD"), ("U_TAGS", "U"), ("X_TAGS", "X"), ("Z_TAGS", "Z"), ("D_TAGS", "D")):
        for t in db[cat]:
            out.setdefault(tuple(t), code)
    return out


def medlens_actions() -> dict[tuple, str]:
    """Table E.1-1 plus medlens' :data:`SUPPLEMENT` (the table wins where both list a tag)."""
    out = profile_actions()
    for t, a in SUPPLEMENT.items():
        out.setdefault(t, a)
    return out


def _effective(code: str, vr: str) -> str:
    if code == "XZU*":
        return "U" if vr == "UI" else "X"
    if code.startswith("X"):
        return "X"
    if code == "ZD":
        return "Z"
    return code


def _in_dictionary(tag) -> bool:
    try:
        get_entry(tag)
        return True
    except KeyError:
        return False


@dataclass
class DeidReport:
    files: int = 0  # files written (files out)
    files_in: int = 0  # files found under the input folder
    skipped: list[str] = field(default_factory=list)  # names of the files not written
    skip_reasons: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), same order
    burned_in: list[str] = field(default_factory=list)
    changes: int = 0
    log_path: Path | None = None

    @property
    def files_out(self) -> int:
        return self.files


class Deidentifier:
    """Applies the basic profile to pydicom datasets; one instance per study (or per consistent key)."""

    def __init__(self, key: str | None = None, date_shift_days: int | None = None, log_values: bool = False,
                 keep_private: bool = False) -> None:
        self.key = key or secrets.token_hex(16)
        self.shift = date_shift_days
        self.log_values = log_values
        self.keep_private = keep_private
        self.actions = medlens_actions()
        self.single = {t: a for t, a in self.actions.items() if len(t) == 2}
        self.masked = [(t, a) for t, a in self.actions.items() if len(t) == 4]

    def new_uid(self, old: str) -> str:
        """Deterministic UID for ``old`` under this key (2.25 + 128-bit hash, a valid DICOM UID)."""
        h = hashlib.sha256(f"{self.key}|{old}".encode()).digest()[:16]
        return f"2.25.{int.from_bytes(h, 'big')}"

    def _action_for(self, tag) -> str | None:
        t = (tag.group, tag.element)
        if t in self.single:
            return self.single[t]
        for (g, e, gm, em), a in self.masked:
            if tag.group & gm == g & gm and tag.element & em == e & em:
                return a
        return None

    def _rule(self, elem, strict: bool, codes_are_phi: bool) -> tuple[str | None, str | None]:
        """(table code, action to take) for ``elem``; action None keeps it (recursing into a sequence)."""
        tag = elem.tag
        if tag.is_private:
            return None, (None if self.keep_private else "X")
        if tag.element == 0:  # group length: stale after any change
            return None, "X"
        code = self._action_for(tag)
        if code is not None:
            return code, _effective(code, elem.VR)
        if not _in_dictionary(tag):  # meaning unknown, so safety unknown
            return None, "X"
        if elem.VR == "PN":
            return "D", "D"
        if strict and elem.VR in _TEXT_VRS and (codes_are_phi or int(tag) not in _CODED_ENTRY):
            return "D", "D"
        return None, None

    def _dummy(self, elem):
        vr = elem.VR
        if vr in ("DA",):
            return "19000101"
        if vr == "DT":
            return "19000101000000"
        if vr == "TM":
            return "000000"
        if vr in ("DS", "IS"):
            return "0"
        if vr in ("FD", "FL", "SS", "US", "SL", "UL", "SV", "UV", "AT"):
            return 0
        if vr == "AS":
            return "000Y"
        if vr == "UI":
            return self.new_uid(str(elem.value))
        if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
            return b"\0\0"
        if vr == "UR":
            return "http://anonymized.invalid"
        return "ANONYMIZED"

    def _shiftable(self, elem, code: str | None) -> bool:
        if self.shift is None or elem.VR not in ("DA", "DT") or not elem.value:
            return False
        t = (elem.tag.group, elem.tag.element)
        return t in OPTION_SHIFTED_DATES or (code is not None and "D" in code)

    def _shift_date(self, elem) -> bool:
        """Shift every value of a DA/DT element by ``self.shift`` days; False (untouched) if any does not parse."""
        shift = self.shift
        if shift is None:
            return False
        values = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        out = []
        for v in values:
            s = str(v)
            if len(s) < 8 or not s[:8].isdigit():
                return False
            try:
                d = _dt.datetime.strptime(s[:8], "%Y%m%d") + _dt.timedelta(days=shift)
            except (ValueError, OverflowError):
                return False
            out.append(d.strftime("%Y%m%d") + s[8:])
        elem.value = out if len(out) > 1 else out[0]
        return True

    def apply(self, ds, log: list[tuple[str, str, str, str, str]], where: str = "", strict: bool = False,
              codes_are_phi: bool = False) -> None:
        """De-identify ``ds`` in place (recursively); append (tag, keyword, action, old, new) to ``log``.

        ``strict`` (inside a sequence whose action is D): every name, date, time and free text
        not listed is replaced too; ``codes_are_phi``: coded entries are replaced as well.
        """
        for tag in list(ds.keys()):  # a snapshot: we delete while iterating
            if int(tag) == PIXEL_DATA:  # Pixel Data: never touched
                continue
            self._apply_element(ds, ds[tag], log, where, strict, codes_are_phi)

    def _apply_element(self, ds, elem, log, where: str, strict: bool, codes_are_phi: bool) -> None:
        tag = elem.tag
        name = f"{where}{elem.keyword or str(tag)}"
        code, act = self._rule(elem, strict, codes_are_phi)
        if act is None:
            if elem.VR == "SQ":
                self._recurse(elem, log, name, strict, codes_are_phi)
            return
        old = _short(elem) if self.log_values else ""
        new = lambda: _short(elem) if self.log_values else ""  # noqa: E731
        if self._shiftable(elem, code) and self._shift_date(elem):
            log.append((str(tag), name, "date shifted", old, new()))
        elif act == "X":
            del ds[tag]
            log.append((str(tag), name, "removed", old, ""))
        elif act == "Z":
            elem.value = [] if elem.VR == "SQ" else (b"" if elem.VR in ("OB", "OW", "UN") else None)
            log.append((str(tag), name, "emptied", old, ""))
        elif act == "U":
            vals = list(elem.value) if elem.VM > 1 else [elem.value]
            remapped = [self.new_uid(str(v)) for v in vals if v]
            elem.value = remapped if elem.VM > 1 else (remapped[0] if remapped else "")
            log.append((str(tag), name, "uid remapped", old, new()))
        elif act == "D" and elem.VR == "SQ":
            self._recurse(elem, log, name, True, codes_are_phi or int(tag) in _CODES_ARE_PHI)
            log.append((str(tag), name, "sequence de-identified", "", ""))
        elif act == "D":
            elem.value = self._dummy(elem)
            log.append((str(tag), name, "replaced", old, new()))
        # K (keep) and anything else: untouched

    def _recurse(self, elem, log, name: str, strict: bool, codes_are_phi: bool) -> None:
        for i, item in enumerate(elem.value or []):
            self.apply(item, log, where=f"{name}[{i}].", strict=strict, codes_are_phi=codes_are_phi)

    def dataset(self, ds) -> list[tuple]:
        """De-identify a whole file dataset: preamble zeroed, file meta rebuilt; return its change log."""
        log: list[tuple] = []
        for tag in [t for t in ds.keys() if t.group == 0x0002]:  # file meta has no place in the data set
            del ds[tag]
        self.apply(ds, log)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.shift is not None else "REMOVED"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        codes = [code]
        if self.shift is not None:
            c2 = Dataset()
            c2.CodeValue, c2.CodingSchemeDesignator = "113107", "DCM"
            c2.CodeMeaning = "Retain Longitudinal Temporal Information Modified Dates Option"
            codes.append(c2)
        ds.DeidentificationMethodCodeSequence = codes
        if hasattr(ds, "preamble"):
            ds.preamble = b"\0" * 128
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta = _new_file_meta(ds)
        return log


def _transfer_syntax(ds):
    """The input's transfer syntax: from its file meta when valid, else from how it was encoded."""
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts:
        ts = uid.UID(str(ts))
        if not ts.is_transfer_syntax:
            raise ValueError("unknown transfer syntax")
        return ts
    implicit, little = ds.original_encoding
    if implicit:
        return uid.ImplicitVRLittleEndian
    return uid.ExplicitVRLittleEndian if little in (True, None) else uid.ExplicitVRBigEndian


def _new_file_meta(ds):
    """File meta built from scratch: nothing of the input's group 0002 but its transfer syntax."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = _transfer_syntax(ds)
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _short(elem) -> str:
    try:
        v = elem.value
        s = v.hex()[:32] if isinstance(v, bytes) else str(v)
    except Exception:
        s = "?"
    return " ".join(s.split())[:120]


_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _read(path: Path) -> Dataset | str:
    """The data set of a DICOM instance, with or without preamble; otherwise why the file is skipped."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        try:  # no preamble/'DICM': a bare data set still parses
            ds = pydicom.dcmread(path, force=True)
            sop_class = str(ds.get("SOPClassUID", "") or "")
        except Exception:
            return _NOT_DICOM
        if not _UID.match(sop_class):
            return _NOT_DICOM
    except Exception as e:
        return f"unreadable DICOM ({type(e).__name__})"
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == _DICOMDIR:
        return "a DICOMDIR (media index): not copied"
    if not str(ds.get("SOPClassUID", "") or ""):
        return "DICOM data set without SOP Class UID (not an instance)"
    return ds


def _check_destination(in_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise DataError("output folder must not be the input folder or inside it", out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise DataError("output exists and is not a folder", out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError("output folder is not empty; give a new or empty folder so two runs never mix", out_dir)


def _output_name(ds, index: int) -> Path:
    """``<study>/<series>/<NNNNNN>.dcm``: short hashes of the new UIDs and the input's position (unique)."""
    study = hashlib.sha1(str(ds.get("StudyInstanceUID", "")).encode()).hexdigest()[:10]
    series = hashlib.sha1(str(ds.get("SeriesInstanceUID", "")).encode()).hexdigest()[:10]
    return Path(study) / series / f"{index:06d}.dcm"


def _deid_file(deid: Deidentifier, path: Path, index: int, work: Path) -> tuple[Path, list[tuple], bool] | str:
    """De-identify one file into ``work``: (rel path, changes, burned-in), or why it was skipped."""
    kind = kind_of(path.name)
    if kind is not None:
        return _deid_other(path, kind, index, work)
    ds = _read(path)
    if isinstance(ds, str):
        return ds
    try:
        if "SOPInstanceUID" not in ds:
            ds.SOPInstanceUID = deid.new_uid(f"no-sop-uid|{index}")
        changes = deid.dataset(ds)
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = _new_file_meta(ds)
        rel = _output_name(ds, index)
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(work / rel, enforce_file_format=True)
    except Exception as e:  # the class only: a message could quote a value
        return f"could not be de-identified ({type(e).__name__})"
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() != "NO"
    return rel, changes, burned


def _deid_other(path: Path, kind: tuple[str, str], index: int, work: Path) -> tuple[Path, list[tuple], bool] | str:
    """A PNG, JPEG or NIfTI file without its metadata, pixels copied as they are (``io.deid_files``)."""
    try:
        data, changes = strip_file(kind[0], kind[1], path.read_bytes(), max_decompressed_bytes())
    except (ValueError, OSError) as e:  # the class and our own message only: never a value of the file
        detail = str(e) if isinstance(e, ValueError) else type(e).__name__
        return f"could not be de-identified as {kind[0].upper()} ({detail})"
    rel = Path("images") / f"{index:06d}{kind[1]}"
    (work / rel).parent.mkdir(parents=True, exist_ok=True)
    (work / rel).write_bytes(data)
    return rel, changes, False


LOG_FIELDS = ["file", "tag", "attribute", "action", "burned_in_annotation_flag", "detail"]


def deidentify_folder(in_dir: str | Path, out_dir: str | Path, key: str | None = None,
                      date_shift_days: int | None = None, log_values: bool = False, progress=None) -> DeidReport:
    """De-identify every DICOM, PNG, JPEG and NIfTI file under ``in_dir`` into the new folder ``out_dir``; write
    ``deid_log.csv`` there.

    Output files are named ``<study>/<series>/<NNNNNN>.dcm`` (short hashes of the new UIDs and the
    input's position in sorted order), so no identifier survives in a path and no two files collide; PNG, JPEG
    and NIfTI files go to ``images/<NNNNNN><suffix>``. Other files are skipped with a reason. The log starts with the exact counts of
    files in, out and skipped; then one row per file (written or skipped) and per changed
    attribute. ``out_dir`` must be absent or empty; everything is written into a hidden temp folder
    beside it and renamed into place when complete.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise DataError("input folder not found", in_dir)
    _check_destination(in_dir, out_dir)
    files = sorted(p for p in in_dir.rglob("*") if p.is_file())
    deid = Deidentifier(key, date_shift_days, log_values)
    with atomic_dir(out_dir) as work:
        rep, rows = _run(deid, in_dir, files, work, log_values, progress)
        if rep.files == 0:
            raise DataError(f"no DICOM, PNG, JPEG or NIfTI files found ({rep.files_in} file(s) skipped)", in_dir)
        _write_log(work / LOG_NAME, rep, rows, log_values)
    rep.log_path = out_dir / LOG_NAME
    return rep


def _run(deid: Deidentifier, in_dir: Path, files: list[Path], work: Path, log_values: bool, progress):
    rep = DeidReport(files_in=len(files))
    rows: list[dict] = []
    for i, p in enumerate(files, start=1):
        if progress:  # files finished so far
            progress(i - 1, len(files))
        done = _deid_file(deid, p, i, work)
        src = {"source": str(p.relative_to(in_dir))} if log_values else {}
        if isinstance(done, str):
            reason = done
            rep.skipped.append(p.name)
            rep.skip_reasons.append((p.name, reason))
            rows.append({"action": "skipped", "detail": f"input #{i}: {reason}", **src})
            continue
        rel, changes, burned = done
        flag = "YES" if burned else ""
        if burned:
            rep.burned_in.append(str(rel))
        rep.files += 1
        rep.changes += len(changes)
        rows.append({"file": str(rel), "action": "written", "burned_in_annotation_flag": flag,
                     "detail": f"input #{i}", **src})
        for tag, name, action, old, new in changes:
            row = {"file": str(rel), "tag": tag, "attribute": name, "action": action, "burned_in_annotation_flag": flag}
            if log_values:
                row.update(src, old_value=old, new_value=new)
            rows.append(row)
    if progress:
        progress(len(files), len(files))
    return rep, rows


def _write_log(path: Path, rep: DeidReport, rows: list[dict], log_values: bool) -> None:
    fields = LOG_FIELDS + (["source", "old_value", "new_value"] if log_values else [])
    counts = [("files in", rep.files_in), ("files out", rep.files), ("files skipped", len(rep.skipped))]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows({"action": what, "detail": str(n)} for what, n in counts)
        w.writerows(rows)
