"""Checks shared by the interoperability tests: dciodvfy (dicom3tools) on every SR/SEG written, and the
HL7 SR-to-FHIR guide's required elements of a Bundle, field by field."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

#: every dciodvfy warning seen by the tests, for the report (warning text -> count)
WARNINGS: Counter = Counter()


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; assert it reports no error; return its warnings."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy missing: run `make system-deps` (Debian package dicom3tools)"
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}: {errors}"
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    WARNINGS.update(warnings)
    return warnings


def resources(bundle_json: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in bundle_json["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    return out


def check_bundle(path: Path, sr) -> dict:
    """Parse ``path`` with fhir.resources (R5) and check the IG's required elements against the SR ``sr``
    (a pydicom dataset); return the JSON."""
    from fhir.resources.bundle import Bundle

    text = Path(path).read_text()
    Bundle.model_validate_json(text)  # parses as R5
    js = json.loads(text)
    assert js["resourceType"] == "Bundle" and js["type"] == "transaction"
    urls = set()
    for e in js["entry"]:
        assert e["fullUrl"].startswith("urn:uuid:") and e["request"]["method"] == "POST"
        assert e["request"]["url"] == e["resource"]["resourceType"]
        urls.add(e["fullUrl"])
        # every entry is a conditional create on an identifier the resource carries: a re-sent Bundle creates
        # nothing twice on a FHIR server
        system, _, value = e["request"]["ifNoneExist"].removeprefix("identifier=").partition("|")
        assert {"system": system, "value": value} in e["resource"]["identifier"], e["request"]
    conditions = [e["request"]["ifNoneExist"] for e in js["entry"]]
    assert len(set(conditions)) == len(conditions), "two entries share a condition: one would be dropped"
    res = resources(js)
    # ImagingStudy: created once, by its Study Instance UID
    (study,) = res["ImagingStudy"]
    assert study["status"] == "available" and study["identifier"][0]["value"] == f"urn:oid:{sr.StudyInstanceUID}"
    study_entry = next(e for e in js["entry"] if e["resource"] is study or e["resource"] == study)
    assert study_entry["request"]["ifNoneExist"] == f"identifier=urn:dicom:uid|urn:oid:{sr.StudyInstanceUID}"
    study_url = study_entry["fullUrl"]
    # ImagingSelection: status, code, study/series UIDs, instances with SOP class; one is the SR itself
    sels = res["ImagingSelection"]
    for s in sels:
        assert s["status"] == "available" and s["code"]["coding"] and s["studyUid"] and s["seriesUid"]
        assert all(i["uid"] and i["sopClass"]["code"].startswith("urn:oid:") for i in s["instance"])
    sr_sel = [s for s in sels if s["instance"][0]["uid"] == str(sr.SOPInstanceUID)]
    assert len(sr_sel) == 1 and sr_sel[0]["seriesUid"] == str(sr.SeriesInstanceUID)
    sr_url = next(e["fullUrl"] for e in js["entry"] if e["resource"] == sr_sel[0])
    # Device: name and type
    for d in res["Device"]:
        assert d["name"][0]["value"] and d["type"]
    device_urls = {e["fullUrl"] for e in js["entry"] if e["resource"]["resourceType"] == "Device"}
    # Observations: status, code, subject, derivedFrom the SR and the study, device
    for o in res["Observation"]:
        assert o["status"] == "final" and o["code"]["coding"][0]["code"] and o["subject"]
        derived = {r["reference"] for r in o["derivedFrom"]}
        assert {sr_url, study_url} <= derived
        assert o["device"]["reference"] in device_urls
        assert o["method"]["coding"]
        for r in o.get("hasMember", []) + o.get("focus", []):
            assert r["reference"] in urls
        if "valueQuantity" in o:
            q = o["valueQuantity"]
            assert isinstance(q["value"], float) and q["code"] and q["system"]
    # DiagnosticReport: status, code, subject, the study, results = the grouping observations
    (rep,) = res["DiagnosticReport"]
    assert rep["status"] == "final" and rep["code"]["coding"][0]["code"] == "18748-4"
    assert rep["study"][0]["reference"] == study_url and rep["result"]
    assert all(r["reference"] in urls for r in rep["result"])
    for b in res.get("BodyStructure", []):
        assert b["includedStructure"][0]["structure"]["coding"] and b["patient"]
    return js
