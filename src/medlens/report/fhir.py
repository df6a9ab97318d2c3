"""DICOM SR TID 1500 -> a FHIR R5 transaction Bundle (``fhir.resources``), after HL7's "DICOM SR to FHIR
Resource Mapping" implementation guide:

- the SR's measurement groups (TID 1501/1410/1411) -> a grouping ``Observation`` each, whose ``hasMember`` are
  one ``Observation`` per measurement (TID 300, ``valueQuantity`` in UCUM) and per qualitative evaluation
  (``valueCodeableConcept``); every Observation has ``derivedFrom`` the SR (an ``ImagingSelection`` of the SR
  instance) and the ``ImagingStudy``, ``device`` the algorithm, ``method`` and ``bodySite``/``bodyStructure``
  from the finding site;
- algorithm identification (TID 4019, or the SR's device observer) -> ``Device`` (name, version, parameters
  such as the weights' SHA-256);
- referenced segments, regions and source images -> ``ImagingSelection``;
- finding sites -> ``BodyStructure``;
- all under a ``DiagnosticReport`` that references the ``ImagingStudy``.

Every entry is a conditional create (``ifNoneExist``), so posting the same SR's Bundle twice creates nothing
twice: the ``ImagingStudy`` by its Study Instance UID (one per study, whichever SR comes first), every other
resource by an identifier derived from the SR's SOP Instance UID and the entry's place (``_Builder.add``).

It reads any TID 1500 SR (through highdicom's content model), not only the ones medlens writes.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import requests
from fhir.resources.bundle import Bundle
from highdicom.sr import CodedConcept

from medlens.errors import DataError
from medlens.io import net
from medlens.report.dicom_sr import LOCAL_SCHEME, OUTSIDE, OUTSIDE_REASON

SYSTEMS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "LN": "http://loinc.org", "UCUM": "http://unitsofmeasure.org", "FMA": "http://purl.org/sig/ont/fma",
           "RADLEX": "http://radlex.org", "RADLEX-RID": "http://radlex.org"}
DICOM_UID = "urn:dicom:uid"
URI_SYSTEM = "urn:ietf:rfc:3986"
#: the namespace of the entries' identifiers (uuid5 of "<SR SOP Instance UID>/<entry>")
ENTRY_NAMESPACE = uuid.UUID("5b1f0c7e-8d44-4c0e-9a57-3c2f6e1d9b20")
#: the DiagnosticReport's code: LOINC "Diagnostic imaging study"
REPORT_CODE = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
IMAGING_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "imaging", "display": "Imaging"}]}

# TID 4019 and TID 1004 concept codes (DCM)
ALGO_NAME, ALGO_VERSION, ALGO_PARAMS = "111001", "111003", "111002"
DEV_UID, DEV_NAME, DEV_MANUFACTURER, DEV_MODEL = "121012", "121013", "121014", "121015"


def coding(concept) -> dict:
    """A DICOM coded concept (highdicom/pydicom) as a FHIR Coding."""
    scheme = str(concept.scheme_designator)
    system = SYSTEMS.get(scheme.upper(), f"urn:dicom:coding-scheme:{scheme}")
    return {"system": system, "code": str(concept.value), "display": str(concept.meaning)}


def concept(c) -> dict:
    return {"coding": [coding(c)], "text": str(c.meaning)}


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _ref(entry_url: str) -> dict:
    return {"reference": entry_url}


def _walk(items):
    """Every content item under ``items`` (depth first)."""
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))


def _text_items(items, code: str) -> list[str]:
    out = []
    for it in _walk(items):
        name = it.get("ConceptNameCodeSequence")
        if name and str(name[0].CodeValue) == code:
            v = it.get("TextValue") or it.get("UID") or it.get("PersonName")
            if v is not None:
                out.append(str(v))
    return out


class _Builder:
    def __init__(self, sr) -> None:
        self.sr = sr
        self.entries: list[dict] = []
        self.sr_uid = str(sr.SOPInstanceUID)
        pid = str(sr.get("PatientID", "") or "")
        self.subject = ({"type": "Patient", "identifier": {"system": "urn:dicom:patient-id", "value": pid}} if pid
                        else {"type": "Patient", "display": "patient of DICOM study " + str(sr.StudyInstanceUID)})

    def add(self, resource: dict, if_none_exist: str | None = None) -> str:
        """Add ``resource`` as a conditional create. Without ``if_none_exist`` its condition is an identifier
        derived from the SR's SOP Instance UID and the entry's place in the Bundle, so the same SR (a re-sent
        result after a crash: the gateway derives the SR's UID from series, run and weights) gives the same
        conditions, and a FHIR server creates nothing a second time."""
        key = f"urn:uuid:{uuid.uuid5(ENTRY_NAMESPACE, f'{self.sr_uid}/{len(self.entries)}')}"
        if if_none_exist is None:
            resource.setdefault("identifier", []).append({"system": URI_SYSTEM, "value": key})
            if_none_exist = f"identifier={URI_SYSTEM}|{key}"
        request = {"method": "POST", "url": resource["resourceType"], "ifNoneExist": if_none_exist}
        self.entries.append({"fullUrl": key, "resource": resource, "request": request})
        return key


def _devices(b: _Builder, sr, groups) -> dict[str, str]:
    """One Device per distinct algorithm (TID 4019) in the groups, else one for the SR's device observer."""
    out: dict[str, str] = {}
    for g in groups:
        names = _text_items(g[0].get("ContentSequence"), ALGO_NAME)
        if not names:
            continue
        versions = _text_items(g[0].get("ContentSequence"), ALGO_VERSION)
        params = _text_items(g[0].get("ContentSequence"), ALGO_PARAMS)
        key = f"{names[0]}|{versions[0] if versions else ''}|{'|'.join(params)}"
        if key in out:
            continue
        out[key] = b.add(_device(names[0], versions[0] if versions else None, params,
                                 str(sr.get("Manufacturer", "") or "") or None))
    if not out:
        root = sr.get("ContentSequence")
        uids, names = _text_items(root, DEV_UID), _text_items(root, DEV_NAME)
        name = (names or [str(sr.get("ManufacturerModelName", "") or sr.get("Manufacturer", "") or "unknown device")])[0]
        dev = _device(name, str(sr.get("SoftwareVersions", "") or "") or None, [],
                      str(sr.get("Manufacturer", "") or "") or None)
        if uids:
            dev["identifier"] = [{"system": DICOM_UID, "value": _oid(uids[0])}]
        out["observer"] = b.add(dev)
    return out


def _device(name: str, version: str | None, params: list[str], manufacturer: str | None) -> dict:
    dev: dict[str, Any] = {"resourceType": "Device", "status": "active",
                           "name": [{"value": name, "type": "user-friendly-name"}],
                           "type": [{"coding": [{"system": SYSTEMS["DCM"], "code": "123110",
                                                 "display": "Artificial Intelligence"}], "text": "algorithm"}]}
    if version:
        dev["version"] = [{"value": version}]
    if manufacturer:
        dev["manufacturer"] = manufacturer
    if params:
        dev["property"] = [{"type": {"coding": [{"system": SYSTEMS["DCM"], "code": ALGO_PARAMS,
                                                 "display": "Algorithm Parameters"}]}, "valueString": p} for p in params]
        for p in params:
            if p.lower().startswith("weights sha-256 "):
                dev["identifier"] = [{"system": "urn:medlens:weights-sha256", "value": p.split()[-1]}]
    return dev


def _group_algorithm_key(g) -> str | None:
    items = g[0].get("ContentSequence")
    names = _text_items(items, ALGO_NAME)
    if not names:
        return None
    versions = _text_items(items, ALGO_VERSION)
    return f"{names[0]}|{versions[0] if versions else ''}|{'|'.join(_text_items(items, ALGO_PARAMS))}"


def _selection(b: _Builder, study_ref: str, study_uid: str, series_uid: str, instances: list[dict], code: dict,
               derived: list[str] | None = None) -> str:
    res = {"resourceType": "ImagingSelection", "status": "available", "subject": b.subject, "code": code,
           "studyUid": study_uid, "seriesUid": series_uid, "instance": instances,
           "derivedFrom": [_ref(study_ref)]}
    if derived:
        res["derivedFrom"] += [_ref(d) for d in derived]
    return b.add(res)


def _sop_class(uid: str) -> dict:
    return {"system": URI_SYSTEM, "code": _oid(uid)}


def sr_to_bundle(sr):
    """A FHIR R5 transaction ``Bundle`` for a TID 1500 SR (a highdicom ``Comprehensive3DSR`` or any SR
    dataset ``highdicom.sr.srread`` gives)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            content = sr.content
        except (AttributeError, ValueError, TypeError) as e:
            raise DataError(f"not a TID 1500 measurement report ({type(e).__name__})") from None
        groups = (list(content.get_image_measurement_groups()) + list(content.get_planar_roi_measurement_groups())
                  + list(content.get_volumetric_roi_measurement_groups()))
    b = _Builder(sr)
    study_uid = str(sr.StudyInstanceUID)
    study_ref = b.add({"resourceType": "ImagingStudy", "status": "available", "subject": b.subject,
                       "identifier": [{"system": DICOM_UID, "value": _oid(study_uid)}]},
                      if_none_exist=f"identifier={DICOM_UID}|{_oid(study_uid)}")
    sr_ref = _selection(b, study_ref, study_uid, str(sr.SeriesInstanceUID),
                        [{"uid": str(sr.SOPInstanceUID), "sopClass": _sop_class(str(sr.SOPClassUID))}],
                        concept(_title(sr)))
    source_ref = _sources(b, sr, study_ref, study_uid)
    devices = _devices(b, sr, groups)
    body: dict[str, str] = {}
    results = []
    for g in groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(_group(b, g, study_ref, study_uid, sr_ref, source_ref, devices, body))
    if not results:
        raise DataError("the TID 1500 report holds no measurement group")
    report = {"resourceType": "DiagnosticReport", "status": "final", "category": [IMAGING_CATEGORY],
              "code": {"coding": [REPORT_CODE, coding(_title(sr))]}, "subject": b.subject,
              "study": [_ref(study_ref)], "result": [_ref(r) for r in results],
              "identifier": [{"system": DICOM_UID, "value": _oid(str(sr.SOPInstanceUID))}]}
    when = _datetime(sr)
    if when:
        report["effectiveDateTime"] = when
    outside = _outside_reasons(groups)
    if outside is not None:  # issue 26: an input outside the training data, exported only when allowed
        report["note"] = [{"text": "Input outside the training data of the model"
                                   + (f": {'; '.join(outside)}" if outside else "")
                                   + ". Treat the result with caution."}]
    b.add(report)
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": b.entries})


def _outside_reasons(groups) -> list[str] | None:
    """The reasons of the SR's "input outside the training data" evaluations (``report.dicom_sr.OUTSIDE``);
    None when no group says the input was outside."""
    found, reasons = False, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in groups:
            for q in g.get_qualitative_evaluations():
                if str(q.name.scheme_designator) != LOCAL_SCHEME:
                    continue
                if str(q.name.value) == OUTSIDE[0]:
                    found = True
                elif str(q.name.value) == OUTSIDE_REASON[0] and str(q.value.meaning) not in reasons:
                    reasons.append(str(q.value.meaning))
    return reasons if found else None


def _title(sr):
    return CodedConcept.from_dataset(sr.ConceptNameCodeSequence[0])


def _datetime(sr) -> str | None:
    d, t = str(sr.get("ContentDate", "") or ""), str(sr.get("ContentTime", "") or "")
    if len(d) != 8 or not d.isdigit():
        return None
    out = f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    if len(t) >= 6 and t[:6].isdigit():
        out += f"T{t[:2]}:{t[2:4]}:{t[4:6]}Z"
    return out


def _sources(b: _Builder, sr, study_ref: str, study_uid: str) -> str | None:
    """The SR's evidence (Current Requested Procedure Evidence) as ImagingSelections, one per series; the
    reference of the first (the source images)."""
    first = None
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            inst = [{"uid": str(i.ReferencedSOPInstanceUID), "sopClass": _sop_class(str(i.ReferencedSOPClassUID))}
                    for i in series.get("ReferencedSOPSequence", [])]
            if not inst:
                continue
            ref = _selection(b, study_ref, str(study.get("StudyInstanceUID", study_uid)),
                             str(series.SeriesInstanceUID), inst,
                             {"coding": [{"system": SYSTEMS["DCM"], "code": "121112", "display": "Source of Measurement"}]})
            first = first or ref
    return first


def _group(b: _Builder, g, study_ref, study_uid, sr_ref, source_ref, devices, body) -> str:
    """One measurement group -> its member Observations and the grouping Observation; returns the latter."""
    finding = g.finding_type
    sites = [s.value for s in (g.finding_sites or [])]
    site_ccs = [concept(CodedConcept.from_dataset(s) if not isinstance(s, CodedConcept) else s) for s in sites]
    structures = []
    for cc in site_ccs:
        key = cc["coding"][0]["system"] + "|" + cc["coding"][0]["code"]
        if key not in body:
            body[key] = b.add({"resourceType": "BodyStructure", "patient": b.subject,
                               "includedStructure": [{"structure": cc}]})
        structures.append(body[key])
    dev = devices.get(_group_algorithm_key(g) or "") or devices.get("observer") or next(iter(devices.values()), None)
    derived = [_ref(sr_ref), _ref(study_ref)]
    focus = _roi_selection(b, g, study_ref, study_uid, finding, sr_ref)
    if focus is None and source_ref is not None:
        focus = source_ref
    method = g.method
    common: dict[str, Any] = {"status": "final", "category": [IMAGING_CATEGORY], "subject": b.subject,
                              "derivedFrom": derived}
    if dev:
        common["device"] = _ref(dev)
    if site_ccs:
        common["bodySite"] = site_ccs[0]
        common["bodyStructure"] = _ref(structures[0])
    if focus:
        common["focus"] = [_ref(focus)]
    if method is not None:
        common["method"] = concept(method)
    elif dev:
        common["method"] = {"coding": [{"system": SYSTEMS["DCM"], "code": "123110",
                                        "display": "Artificial Intelligence"}], "text": "automated measurement"}
    members = []
    for m in g.get_measurements():
        obs = {"resourceType": "Observation", **common, "code": concept(m.name),
               "valueQuantity": {"value": float(m.value), "unit": str(m.unit.meaning),
                                 "system": SYSTEMS["UCUM"] if str(m.unit.scheme_designator) == "UCUM"
                                 else coding(m.unit)["system"], "code": str(m.unit.value)}}
        mods = [x for x in (m.derivation, m.method) if x is not None]
        if mods:
            obs["method"] = {"coding": [coding(x) for x in mods], "text": ", ".join(str(x.meaning) for x in mods)}
        members.append(b.add(obs))
    for q in g.get_qualitative_evaluations():
        members.append(b.add({"resourceType": "Observation", **common, "code": concept(q.name),
                              "valueCodeableConcept": concept(q.value)}))
    grouping = {"resourceType": "Observation", **common,
                "code": concept(finding) if finding is not None else
                {"coding": [{"system": SYSTEMS["DCM"], "code": "125007", "display": "Measurement Group"}]},
                "hasMember": [_ref(m) for m in members]}
    ident = [{"system": DICOM_UID, "value": _oid(str(g.tracking_uid))}] if g.tracking_uid else []
    if ident:
        grouping["identifier"] = ident
    if g.tracking_identifier:
        grouping["note"] = [{"text": f"tracking identifier: {g.tracking_identifier}"}]
    if g.finding_category is not None:
        grouping["category"] = [IMAGING_CATEGORY, concept(g.finding_category)]
    return b.add(grouping)


def _roi_selection(b: _Builder, g, study_ref, study_uid, finding, sr_ref) -> str | None:
    """The group's referenced segment (or segmentation frame) as an ImagingSelection of the SEG instance."""
    seg = getattr(g, "referenced_segment", None) or getattr(g, "referenced_segmentation_frame", None)
    if seg is None:
        return None
    try:
        series = seg.source_series_for_segmentation.value if hasattr(seg, "source_series_for_segmentation") else None
    except (AttributeError, IndexError):
        series = None
    # the SEG's own series is not recorded in the SR content; the SR's evidence lists it
    seg_series = _series_of(b.sr, str(seg.referenced_sop_instance_uid)) or series or ""
    code = concept(finding) if finding is not None else {"text": "segment"}
    inst = {"uid": str(seg.referenced_sop_instance_uid), "sopClass": _sop_class(str(seg.referenced_sop_class_uid)),
            "subset": [str(n) for n in seg.referenced_segment_numbers]}
    return _selection(b, study_ref, study_uid, seg_series, [inst], code, [sr_ref])


def _series_of(sr, sop_uid: str) -> str | None:
    for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(seq, []):
            for series in study.get("ReferencedSeriesSequence", []):
                if any(str(i.ReferencedSOPInstanceUID) == sop_uid for i in series.get("ReferencedSOPSequence", [])):
                    return str(series.SeriesInstanceUID)
    return None


def post_bundle(bundle, url: str, timeout: float | None = None, allow_http: bool = False) -> dict:
    """POST a transaction Bundle to a FHIR server base URL; the response Bundle (dict), or a one-line error.

    The Bundle goes to ``url`` only (``medlens.io.net``): a redirect is refused, not followed (it would re-send
    the Bundle, patient identifier included, elsewhere); plain ``http://`` to another host needs
    ``allow_http``; ``timeout`` (default ``MEDLENS_NET_TIMEOUT``) bounds the connect and each read; the reply
    is read within ``MEDLENS_MAX_RESPONSE_BYTES``, an error reply up to 64 KiB."""
    net.check_http_url(url, allow_http, "FHIR server")
    shown = net.shown_url(url)
    connect, read = net.timeouts()
    if timeout is not None:
        connect, read = min(connect, timeout), timeout
    try:
        with net.session() as s:
            r = s.post(url, data=bundle.model_dump_json(exclude_none=True).encode("utf-8"),
                       headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
                       timeout=(connect, read))
            if r.status_code >= 300:
                detail = net.error_detail(r)
                raise DataError("FHIR server refused the transaction "
                                f"(HTTP {r.status_code}{': ' + detail if detail else ''})", shown)
            try:
                reply = r.json()
            except ValueError:
                reply = {}
    except net.RedirectRefused as e:
        raise DataError(f"FHIR server answered with a redirect (HTTP {e.status}); the Bundle was not re-sent "
                        "elsewhere: give the server's own URL", shown) from None
    except net.BodyTooLarge as e:
        raise DataError(f"FHIR server reply: {e.describe()}", shown) from None
    except requests.exceptions.Timeout:
        raise DataError(f"FHIR server did not answer in time ({net.TIMEOUT_ENV}={read:g} s)", shown) from None
    except requests.exceptions.RequestException as e:
        raise DataError(f"FHIR server unreachable ({type(e).__name__})", shown) from None
    return reply if isinstance(reply, dict) else {}
