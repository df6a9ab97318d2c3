"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The attribute list and each attribute's action (Table E.1-1) come from the maintained
``dicom-anonymizer`` package's database of the current standard edition; medlens applies it:

- ``X`` remove, ``Z`` empty, ``D`` replace with a dummy value of the right VR, ``U`` remap UID;
  combined actions take the strongest (``X/Z/D`` -> remove, ``Z/D`` -> empty, ``X/Z/U*`` -> remap
  UIDs, remove the rest);
- UIDs are remapped deterministically from a key, so every file of a study gets the same new
  Study/Series/FrameOfReference UIDs (and re-running with the same key gives the same UIDs);
- all private tags are removed; sequences are de-identified recursively;
- dates can be shifted by a fixed number of days instead of being removed (the "Retain
  Longitudinal Temporal Information with Modified Dates" option);
- images whose BurnedInAnnotation is not ``NO`` are flagged: their pixels may show identifiers;
- pixel data is never touched (bit-identical), and a CSV log lists what changed per file,
  without the old values unless ``log_values=True``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from medlens.errors import DataError

PROFILE_DB = "dicomfields_2026c"
METHOD = "PS3.15 E.1 Basic Profile (medlens)"


def profile_actions() -> dict[tuple, str]:
    """Table E.1-1 as ``{tag tuple: action}``; tags of repeating groups are (group, elem, gmask, emask)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    db = dicom_anonymization_database_selector(PROFILE_DB)
    out: dict[tuple, str] = {}
    for cat, code in (("X_Z_U_STAR_TAGS", "XZU*"), ("X_Z_D_TAGS", "XZD"), ("X_D_TAGS", "XD"), ("X_Z_TAGS", "XZ"),
                      ("Z_D_TAGS", "ZD"), ("U_TAGS", "U"), ("X_TAGS", "X"), ("Z_TAGS", "Z"), ("D_TAGS", "D")):
        for t in db[cat]:
            out.setdefault(tuple(t), code)
    return out


def _effective(code: str, vr: str) -> str:
    if code == "XZU*":
        return "U" if vr == "UI" else "X"
    if code.startswith("X"):
        return "X"
    if code == "ZD":
        return "Z"
    return code


@dataclass
class DeidReport:
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    burned_in: list[str] = field(default_factory=list)
    changes: int = 0
    log_path: Path | None = None


class Deidentifier:
    """Applies the basic profile to pydicom datasets; one instance per study (or per consistent key)."""

    def __init__(self, key: str | None = None, date_shift_days: int | None = None, log_values: bool = False,
                 keep_private: bool = False) -> None:
        self.key = key or secrets.token_hex(16)
        self.shift = date_shift_days
        self.log_values = log_values
        self.keep_private = keep_private
        self.actions = profile_actions()
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
        if vr in ("FD", "FL", "SS", "US", "SL", "UL", "SV", "UV"):
            return 0
        if vr == "AS":
            return "000Y"
        if vr == "UI":
            return self.new_uid(str(elem.value))
        if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
            return b"\0\0"
        if vr == "UR":
            return "http://anonymized.invalid"
        if vr == "AE":
            return "ANONYMIZED"
        return "ANONYMIZED"

    def _shift_date(self, elem) -> bool:
        if self.shift is None or elem.VR not in ("DA", "DT") or not elem.value:
            return False
        try:
            s = str(elem.value)
            d = _dt.datetime.strptime(s[:8], "%Y%m%d") + _dt.timedelta(days=self.shift)
            elem.value = d.strftime("%Y%m%d") + s[8:]
            return True
        except ValueError:
            return False

    def apply(self, ds, log: list[tuple[str, str, str, str, str]], where: str = "") -> None:
        """De-identify ``ds`` in place (recursively); append (tag, keyword, action, old, new) to ``log``."""
        from pydicom.dataelem import DataElement

        if not self.keep_private:
            ds.remove_private_tags()
        for elem in list(ds):  # a snapshot: we delete while iterating
            if isinstance(elem, DataElement) is False:
                elem = ds[elem.tag]
            tag = elem.tag
            if tag == 0x7FE00010:  # Pixel Data: never touched
                continue
            code = self._action_for(tag)
            name = f"{where}{elem.keyword or str(tag)}"
            if code is None:
                if elem.VR == "SQ":
                    for i, item in enumerate(elem.value):
                        self.apply(item, log, where=f"{name}[{i}].")
                continue
            act = _effective(code, elem.VR)
            old = "" if not self.log_values else _short(elem)
            if elem.VR in ("DA", "DT") and act in ("Z", "D", "X") and self._shift_date(elem):
                log.append((str(tag), name, "date shifted", old, _short(elem) if self.log_values else ""))
                continue
            if act == "X":
                del ds[tag]
                log.append((str(tag), name, "removed", old, ""))
            elif act == "Z":
                elem.value = [] if elem.VR == "SQ" else (b"" if elem.VR in ("OB", "OW", "UN") else None)
                log.append((str(tag), name, "emptied", old, ""))
            elif act == "U":
                vals = elem.value if elem.VM > 1 else [elem.value]
                new = [self.new_uid(str(v)) for v in vals if v]
                elem.value = new if elem.VM > 1 else (new[0] if new else "")
                log.append((str(tag), name, "uid remapped", old, _short(elem) if self.log_values else ""))
            elif act == "D":
                if elem.VR == "SQ":
                    for i, item in enumerate(elem.value):
                        self.apply(item, log, where=f"{name}[{i}].")
                    log.append((str(tag), name, "sequence de-identified", "", ""))
                else:
                    elem.value = self._dummy(elem)
                    log.append((str(tag), name, "replaced", old, _short(elem) if self.log_values else ""))
            # K (keep) and anything else: untouched

    def dataset(self, ds) -> list[tuple]:
        """De-identify a whole file dataset (file meta included); return its change log."""
        from pydicom.dataset import Dataset

        log: list[tuple] = []
        self.apply(ds, log)
        if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
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
        return log


def _short(elem) -> str:
    try:
        v = elem.value
        s = v.hex()[:32] if isinstance(v, bytes) else str(v)
    except Exception:
        s = "?"
    return " ".join(s.split())[:120]


def deidentify_folder(in_dir: str | Path, out_dir: str | Path, key: str | None = None,
                      date_shift_days: int | None = None, log_values: bool = False, progress=None) -> DeidReport:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir``; write ``deid_log.csv`` there.

    Output files are named by their new UIDs (``<study>/<series>/<sop>.dcm``, short hashes) so no
    identifier survives in a path. Non-DICOM files are skipped and listed in the report.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medlens.utils import atomic_path

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise DataError("input folder not found", in_dir)
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise DataError("output folder must not be the input folder or inside it", out_dir)
    files = sorted(p for p in in_dir.rglob("*") if p.is_file())
    deid = Deidentifier(key, date_shift_days, log_values)
    rep = DeidReport()
    rows = []
    for i, p in enumerate(files):
        if progress:
            progress(i + 1, len(files))
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, Exception):
            rep.skipped.append(p.name)
            continue
        changes = deid.dataset(ds)
        sop = str(ds.get("SOPInstanceUID", deid.new_uid(str(p))))
        study = hashlib.sha1(str(ds.get("StudyInstanceUID", "")).encode()).hexdigest()[:10]
        series = hashlib.sha1(str(ds.get("SeriesInstanceUID", "")).encode()).hexdigest()[:10]
        rel = Path(study) / series / f"{hashlib.sha1(sop.encode()).hexdigest()[:16]}.dcm"
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() != "NO"
        if burned:
            rep.burned_in.append(str(rel))
        with atomic_path(out_dir / rel) as tmp:
            ds.save_as(tmp, enforce_file_format=False)
        rep.files += 1
        rep.changes += len(changes)
        for tag, name, action, old, new in changes:
            row = {"file": str(rel), "tag": tag, "attribute": name, "action": action,
                   "burned_in_annotation_flag": "YES" if burned else ""}
            if log_values:
                row.update(source=str(p.relative_to(in_dir)), old_value=old, new_value=new)
            rows.append(row)
    if rep.files == 0:
        raise DataError("no DICOM files found", in_dir)
    fields = ["file", "tag", "attribute", "action", "burned_in_annotation_flag"] + (
        ["source", "old_value", "new_value"] if log_values else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    rep.log_path = out_dir / "deid_log.csv"
    with atomic_path(rep.log_path) as tmp:
        tmp.write_text(buf.getvalue())
    return rep
