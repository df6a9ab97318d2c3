"""Clinical interoperability on real data: DICOM SEG with clinical codes, DICOM SR TID 1500 (nodules and a
classifier), FHIR R5 Bundles (ours and a third party's SR), POSTing a Bundle, privacy and bad input.

Every SR and SEG written here passes dciodvfy (dicom3tools) without errors; every Bundle parses as R5 and is
checked field by field (tests/interop_checks.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from interop_checks import check_bundle, dciodvfy, resources
from clirun import medlens  # in-process: the console script's entry point

REPO = Path(__file__).resolve().parents[2]
NAME, PID = "Quixotewright^Zebulonia", "PID-ZQ-739104"  # a distinctive patient, to hunt for in every output



def one_line_error(r, *needles) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def lidc_series(root: Path) -> Path:
    return root / "lidc-idri-0001"


def lidc_xml(root: Path) -> Path:
    return next(lidc_series(root).rglob("*.xml"))


def num_items(ds) -> dict[str, list[float]]:
    """NUM content items under the SR's Imaging Measurements container (DCM 126010), by concept meaning, read
    with pydicom alone (independent of highdicom); the image library's descriptors are not measurements."""
    out: dict[str, list[float]] = {}
    (container,) = [it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010"]

    def walk(items):
        for it in items or []:
            if it.get("ValueType") == "NUM":
                name = str(it.ConceptNameCodeSequence[0].CodeMeaning)
                out.setdefault(name, []).append(float(it.MeasuredValueSequence[0].NumericValue))
            walk(it.get("ContentSequence"))

    walk(container.ContentSequence)
    return out


# ---------------------------------------------------------------------------------------------- SEG


def test_seg_codes_and_empty_first_and_last_slices(tmp_path, data_root):
    """Frames sit on their own source slices when the first, last and a middle slice are empty."""
    import highdicom as hd

    from medlens.config import SegmentDicomCodes
    from medlens.io import load
    from medlens.io.dicom_seg import codes_from_config, write_dicom_seg
    from medlens.io.writers import write_dicom_series

    series = tmp_path / "brain1"
    write_dicom_series(load(data_root / "mri-seg" / "brain1_image.nrrd"), series, modality="MR")
    vol = load(series)
    n = vol.shape[0]
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:9, 100:140, 90:150] = 1
    mask[11:n - 3, 60:80, 60:95] = 2
    mask[5, 120:130, 100:110] = 2
    assert not mask[0].any() and not mask[-1].any() and not mask[9:11].any()
    cfg = [SegmentDicomCodes.model_validate(c) for c in (
        {"category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"},
         "type": {"value": "52988006", "meaning": "Lesion"}, "region": {"value": "12738006", "meaning": "Brain"}},
        {"category": {"value": "91723000", "meaning": "Anatomical Structure"},
         "type": {"value": "59820001", "meaning": "Blood Vessel"}, "region": {"value": "5665001", "meaning": "Retina"}})]
    path = write_dicom_seg(mask, vol, series, tmp_path / "seg.dcm", ["background", "lesion", "vessel"],
                           codes=codes_from_config(cfg, 2))
    dciodvfy(path)
    # the sources, ordered by position along the normal, read with pydicom alone
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.glob("*.dcm"))]
    normal = np.cross(*np.reshape([float(v) for v in src[0].ImageOrientationPatient], (2, 3)))
    src.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    index = {d.SOPInstanceUID: k for k, d in enumerate(src)}
    raw = pydicom.dcmread(path)
    frames = raw.pixel_array.reshape(-1, *vol.shape[1:])
    seen = set()
    for i, fg in enumerate(raw.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k, segment = index[uid], int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_allclose([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in src[k].ImagePositionPatient], atol=1e-3)
        np.testing.assert_array_equal(frames[i].astype(bool), mask[k] == segment)
        seen.add((k, segment))
    assert seen == {(k, s) for s in (1, 2) for k in range(n) if (mask[k] == s).any()}  # empty frames left out
    seg = hd.seg.segread(path)  # and through highdicom, by source SOP instance
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in src], combine_segments=True,
                                             skip_overlap_checks=True)
    np.testing.assert_array_equal(back, mask)
    s1, s2 = raw.SegmentSequence
    assert (s1.SegmentedPropertyTypeCodeSequence[0].CodeValue, s1.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
            s1.AnatomicRegionSequence[0].CodeMeaning) == ("52988006", "Lesion", "Brain")
    assert (s2.SegmentedPropertyCategoryCodeSequence[0].CodeValue, s2.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
            s2.AnatomicRegionSequence[0].CodeMeaning) == ("91723000", "Blood Vessel", "Retina")
    assert all(s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning != "Tissue" for s in raw.SegmentSequence)


# ---------------------------------------------------------------------------------------------- nodules


@pytest.fixture(scope="module")
def nodule_outputs(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("nodules")
    r = medlens("nodules", "lidc", lidc_xml(data_root), lidc_series(data_root), "--mask-out", tmp / "mask.nii.gz",
                "--outputs", "sr,seg,fhir", "--out", tmp / "out", check=True)
    return tmp, r


def test_nodule_sr_matches_features_and_an_independent_count(nodule_outputs, data_root):
    from scipy.spatial.distance import pdist

    from medlens.io import load

    tmp, _ = nodule_outputs
    out = tmp / "out"
    sr_path, seg_path = out / "lidc-idri-0001_sr.dcm", out / "lidc-idri-0001_seg.dcm"
    assert sorted(p.name for p in out.iterdir()) == ["lidc-idri-0001_fhir.json", "lidc-idri-0001_seg.dcm",
                                                       "lidc-idri-0001_sr.dcm"]
    dciodvfy(sr_path)
    dciodvfy(seg_path)
    sr = pydicom.dcmread(sr_path)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500" and sr.Modality == "SR"
    vals = num_items(sr)
    # `medlens features` on the same mask
    feats = medlens("features", lidc_series(data_root), tmp / "mask.nii.gz", check=True).stdout
    f = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+)\s+│?\s*(-?[\d.e+]+)\s*", feats)}
    assert vals["Volume"][0] == pytest.approx(f["volume_mm3"], rel=0.01)
    assert vals["Diameter"][0] == pytest.approx(f["max_diameter_mm"], rel=0.01)
    # an independent count: voxels x voxel volume; the largest distance between surface voxel centres
    scan, mask = load(lidc_series(data_root)), load(tmp / "mask.nii.gz").array > 0
    assert vals["Volume"][0] == pytest.approx(mask.sum() * np.prod(scan.spacing), rel=1e-6)
    from scipy.ndimage import binary_erosion

    surface = np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(scan.spacing)
    assert vals["Diameter"][0] == pytest.approx(pdist(surface).max(), rel=0.01)
    hu = scan.array[mask].astype(float)
    assert vals["Mean"][0] == pytest.approx(hu.mean(), rel=1e-6) and vals["Standard Deviation"][0] == pytest.approx(
        hu.std(), rel=1e-6)
    assert 20 < vals["Diameter"][0] < 45  # the LUNA16 nodule of this scan: 23 mm volume-equivalent
    # the SEG reads back equal to the NIfTI mask (frames placed by their source instances)
    import highdicom as hd

    from medlens.io.dicom_seg import source_slices

    seg = hd.seg.segread(seg_path)
    uids = [d.SOPInstanceUID for d in source_slices(lidc_series(data_root), scan)]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back > 0, mask)
    (segment,) = pydicom.dcmread(seg_path, stop_before_pixels=True).SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Nodule"
    assert segment.AnatomicRegionSequence[0].CodeMeaning == "Lung"
    # the SR group references that segment, carries tracking id + UID and the algorithm
    (group,) = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert group.referenced_segment.referenced_segment_numbers == [1]
    assert group.tracking_identifier == "Nodule 1" and group.tracking_uid == segment.TrackingUID
    assert {u.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for u in se.ReferencedSOPSequence} == set(uids) | {seg.SOPInstanceUID}
    js = check_bundle(out / "lidc-idri-0001_fhir.json", sr)
    res = resources(js)
    vol = [o for o in res["Observation"] if o["code"]["coding"][0]["code"] == "118565006"]
    assert vol[0]["valueQuantity"]["value"] == pytest.approx(vals["Volume"][0]) and vol[0]["valueQuantity"]["code"] == "mm3"
    assert vol[0]["bodySite"]["coding"][0]["code"] == "39607008"
    (segsel,) = [s for s in res["ImagingSelection"] if s["instance"][0]["uid"] == seg.SOPInstanceUID
                 and "subset" in s["instance"][0]]
    assert segsel["instance"][0]["subset"] == ["1"] and segsel["seriesUid"] == seg.SeriesInstanceUID


# ---------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def phi_slice(tmp_path_factory, data_root) -> Path:
    """A real LIDC CT slice whose patient has a distinctive name and ID."""
    src = sorted(p for p in lidc_series(data_root).rglob("*.dcm"))[60]
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientID = NAME, PID
    out = tmp_path_factory.mktemp("phi") / "slice.dcm"
    ds.save_as(out)
    return out


def _no_phi(*texts: str) -> None:
    for t in texts:
        for s in (NAME, PID, "Quixotewright", "Zebulonia"):
            assert s not in t, f"patient identifier {s!r} leaked"


def test_classifier_sr_equals_predictions_csv(trained_run, phi_slice, tmp_path):
    import highdicom as hd

    from medlens.run import Predictor, Run

    # a CT slice is outside the X-ray model's training data: exported only when allowed (issue 26)
    r = medlens("predict", trained_run, phi_slice, "--out", tmp_path / "o", "--outputs", "sr,fhir",
                "--allow-out-of-profile", check=True)
    _no_phi(r.stdout, r.stderr)
    csv = pd.read_csv(tmp_path / "o" / "predictions.csv").iloc[0]
    run = Run.open(trained_run)
    expected = Predictor(run).predict_files([str(phi_slice)])[0]
    assert csv["prediction"] == expected.prediction and csv["probability"] == pytest.approx(expected.probability)
    sr_path = tmp_path / "o" / "slice_sr.dcm"
    dciodvfy(sr_path)
    sr = pydicom.dcmread(sr_path)
    vals = num_items(sr)
    positive = run.class_names[1]
    assert vals["Probability"] == [pytest.approx(csv[f"p_{positive}"], abs=1e-6)]
    assert vals["Decision threshold"] == [pytest.approx(csv["threshold"], abs=1e-9)]
    assert csv["threshold"] == pytest.approx(run.meta.threshold.value)
    # the operating point of the split it was measured on, named: the test split of an evaluated run (issue 26)
    metrics = json.loads((trained_run / "metrics.json").read_text())["test"]["metrics"]
    assert vals["Sensitivity at validation threshold on test"] == [pytest.approx(metrics["sensitivity"]["value"])]
    assert vals["Specificity at validation threshold on test"] == [pytest.approx(metrics["specificity"]["value"])]
    assert not any("on validation" in k for k in vals)
    (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    qe = group.get_qualitative_evaluations()[0]
    assert qe.name.meaning == positive and group.finding_type.meaning == positive
    assert qe.value.meaning == ("Present" if csv["prediction"] == positive else "Absent")
    # algorithm identification: model, medlens version, weights hash; evidence: the source instance
    params = [str(it.TextValue) for it in _walk(sr.ContentSequence) if
              it.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert f"weights SHA-256 {run.weights_sha256}" in params
    src = pydicom.dcmread(phi_slice, stop_before_pixels=True)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [e.ReferencedSOPInstanceUID for e in ev] == [src.SOPInstanceUID]
    js = check_bundle(tmp_path / "o" / "slice_fhir.json", sr)
    (dev,) = resources(js)["Device"]
    assert dev["identifier"][0]["value"] == run.weights_sha256 and dev["name"][0]["value"] == f"medlens {run.meta.model}"
    prob = [o for o in resources(js)["Observation"] if o["code"]["coding"][0]["code"] == "122157"]
    assert prob[0]["valueQuantity"]["value"] == pytest.approx(csv[f"p_{positive}"], abs=1e-6)


def _walk(items):
    for it in items or []:
        yield it
        yield from _walk(it.get("ContentSequence"))


def test_deidentify_and_no_phi_in_logs_or_errors(trained_run, phi_slice, tmp_path, data_root):
    r = medlens("predict", trained_run, phi_slice, "--out", tmp_path / "d", "--outputs", "sr,fhir", "--deidentify",
                "--allow-out-of-profile", check=True)
    _no_phi(r.stdout, r.stderr)
    sr = pydicom.dcmread(tmp_path / "d" / "slice_sr.dcm")
    src = pydicom.dcmread(phi_slice, stop_before_pixels=True)
    _no_phi(str(sr), (tmp_path / "d" / "slice_fhir.json").read_text())
    assert sr.PatientIdentityRemoved == "YES" and sr.StudyInstanceUID != src.StudyInstanceUID
    dciodvfy(tmp_path / "d" / "slice_sr.dcm")
    check_bundle(tmp_path / "d" / "slice_fhir.json", sr)
    # bad input: one line, nothing written, no patient identifier
    one_line_error(medlens("predict", trained_run, phi_slice, "--out", tmp_path / "x", "--outputs", "seg"),
                   "a classifier has no segments")
    png = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    _no_phi(one_line_error(medlens("predict", trained_run, phi_slice, png, "--out", tmp_path / "x", "--outputs",
                                   "sr"), "need DICOM input", "img.png"))
    assert not (tmp_path / "x").exists()
    # a series mixing frames of reference, with the distinctive patient in every slice
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    slices = sorted((pydicom.dcmread(p) for p in lidc_series(data_root).rglob("*.dcm")),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    for i, ds in enumerate(slices[50:58]):  # eight neighbouring slices
        ds.PatientName, ds.PatientID = NAME, PID
        if i == 4:
            ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
        ds.save_as(mixed / f"{i:03d}.dcm")
    line = one_line_error(medlens("predict", trained_run, mixed, "--out", tmp_path / "y", "--outputs", "sr"),
                          "mixes 2 frames of reference")
    _no_phi(line)
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------- FHIR


def _independent_sr(data_root: Path, out: Path) -> Path:
    """A TID 1500 SR built here with highdicom's own classes (not medlens's builders) on a real LIDC slice: two
    planar ROI groups with their measurements, and a device observer, as another vendor's SR would carry them."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    src = pydicom.dcmread(next(lidc_series(data_root).rglob("*.dcm")))
    z = float(src.ImagePositionPatient[2])
    groups = []
    for k, (x, y, d) in enumerate([(40.0, 60.0, 8.5), (-70.0, 20.0, 12.25)]):
        a = np.linspace(0, 2 * np.pi, 13)
        ring = np.column_stack([x + d / 2 * np.cos(a), y + d / 2 * np.sin(a), np.full(13, z)])
        ring[-1] = ring[0]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {k + 1}"),
            referenced_region=hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=ring,
                                                  frame_of_reference_uid=src.FrameOfReferenceUID),
            finding_type=codes.SCT.Nodule,
            measurements=[hd.sr.Measurement(name=codes.SCT.Diameter, value=d, unit=codes.UCUM.Millimeter),
                          hd.sr.Measurement(name=codes.SCT.Area, value=round(np.pi * d * d / 4, 3),
                                            unit=codes.UCUM.SquareMillimeter)]))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="independent-reader-device")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=[src], content=report[0], series_instance_uid=hd.UID(), series_number=7,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer="independent")
    path = out / "independent_sr.dcm"
    sr.save_as(path)
    return path


def test_independent_sr_to_fhir(tmp_path, data_root):
    """A TID 1500 SR written by highdicom directly (not through medlens): every measurement becomes an Observation."""
    import highdicom as hd

    sr_path = _independent_sr(data_root, tmp_path)
    r = medlens("fhir", sr_path, "-o", tmp_path / "b.json", check=True)
    assert "transaction Bundle" in r.stdout
    sr = pydicom.dcmread(sr_path)
    js = check_bundle(tmp_path / "b.json", sr)
    # the same SR gives the same Bundle, conditions included (a result re-sent after a crash creates nothing twice)
    medlens("fhir", sr_path, "-o", tmp_path / "again.json", check=True)
    assert json.loads((tmp_path / "again.json").read_text()) == js
    res = resources(js)
    values = num_items(sr)
    assert sorted(values.get("Diameter", [])) == [8.5, 12.25]
    got: dict[str, list[float]] = {}
    for o in res["Observation"]:
        if "valueQuantity" in o:
            got.setdefault(o["code"]["text"], []).append(o["valueQuantity"]["value"])
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in values.items()}
    groups = hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    grouping = [o for o in res["Observation"] if "hasMember" in o]
    assert len(grouping) == len(groups) == 2 and len(res["DiagnosticReport"][0]["result"]) == len(groups)
    assert {o["identifier"][0]["value"] for o in grouping} == {f"urn:oid:{g.tracking_uid}" for g in groups}
    (dev,) = res["Device"]
    assert dev["name"][0]["value"] == "independent-reader-device"


def test_not_tid1500_and_bad_files_are_one_line_errors(tmp_path):
    from pydicom.data import get_testdata_file

    basic = get_testdata_file("test-SR.dcm")  # pydicom's Comprehensive SR without TID 1500
    one_line_error(medlens("fhir", basic, "-o", tmp_path / "b.json"), "not a TID 1500 measurement report")
    one_line_error(medlens("fhir", get_testdata_file("CT_small.dcm"), "-o", tmp_path / "b.json"),
                   "not a DICOM structured report")
    (tmp_path / "t.dcm").write_text("hello")
    one_line_error(medlens("fhir", tmp_path / "t.dcm", "-o", tmp_path / "b.json"), "t.dcm")
    assert not (tmp_path / "b.json").exists()


FHIR_SERVER = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    out = sys.argv[2]
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.endswith("/refuse"):
                reply, code = {"resourceType": "OperationOutcome", "issue": [{"severity": "error",
                               "code": "processing", "diagnostics": "transaction rejected by test server"}]}, 422
            else:
                open(out, "wb").write(body)
                n = len(json.loads(body)["entry"])
                reply, code = {"resourceType": "Bundle", "type": "transaction-response",
                               "entry": [{"response": {"status": "201 Created"}}] * n}, 200
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def log_message(self, *a):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


def test_post_bundle_to_a_fhir_endpoint(tmp_path, data_root):
    from orthanc import free_port

    sr_path = _independent_sr(data_root, tmp_path)
    port = free_port()
    (tmp_path / "server.py").write_text(FHIR_SERVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "server.py"), str(port), str(tmp_path / "posted.json")])
    try:
        for _ in range(100):
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        r = medlens("fhir", sr_path, "--post", f"http://127.0.0.1:{port}/fhir", check=True)
        posted = json.loads((tmp_path / "posted.json").read_text())
        assert posted["type"] == "transaction" and f"posted {len(posted['entry'])} resources" in r.stdout
        check_bundle(tmp_path / "posted.json", pydicom.dcmread(sr_path))
        one_line_error(medlens("fhir", sr_path, "--post", f"http://127.0.0.1:{port}/refuse"),
                       "refused the transaction", "HTTP 422", "transaction rejected by test server")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    one_line_error(medlens("fhir", sr_path, "--post", f"http://127.0.0.1:{port}/fhir"), "unreachable")
