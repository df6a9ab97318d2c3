"""The gateway's parts on their own (issue 28): the config's one-line errors, the durable queue's state machine
and idempotency, routing reasons, the bounded jittered backoff, and the C-STORE SCP over a real pynetdicom
association (a write that fails answers 0xA700 and leaves nothing; the same instance twice is kept once).
The whole gateway against Orthanc is tests/e2e/test_gateway.py."""

from __future__ import annotations

import random
import time
import urllib.request
import socket
import sqlite3

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from clirun import medlens
from medlens.gateway.audit import AuditLog, uid_hash
from medlens.gateway.config import GatewayConfig, load_gateway_config
from medlens.gateway.metrics import GatewayMetrics
from medlens.gateway.queue import Queue
from medlens.gateway.scp import Spool, StoreSCP
from medlens.gateway.worker import backoff, choose_rule, result_uid

KEY = "unit-site-key-0123456789"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, **over) -> dict:
    d = {"listen": {"ae_title": "GW", "host": "127.0.0.1", "port": _free_port()}, "allowed_aets": ["SENDER"],
         "spool": str(tmp_path / "spool"), "audit": str(tmp_path / "audit.jsonl"), "site_key_env": "GW_UNIT_KEY",
         "rules": [{"name": "xr", "match": {"modality": ["DX"]}, "runs": [str(tmp_path / "run")]}],
         "destinations": [{"name": "pacs", "kind": "dimse", "url": "dimse://PACS@127.0.0.1:104"}]}
    d.update(over)
    return d


def _one_line(r, *needles) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_config_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    import yaml

    cfg = tmp_path / "gw.yaml"
    cases = [
        ({**_config(tmp_path), "quiet_perid_s": 3}, ["unknown key 'quiet_perid_s'"]),
        (_config(tmp_path, allowed_aets=["A\\B"]), ["not a DICOM AE title"]),
        (_config(tmp_path, rules=[{"name": "r", "match": {"series_description": "(["}, "runs": ["x"]}]),
         ["not a regular expression"]),
        (_config(tmp_path, rules=[{"name": "r", "match": {"slices": {"min": 9, "max": 2}}, "runs": ["x"]}]),
         ["range min 9.0 is above max 2.0"]),
        (_config(tmp_path, destinations=[{"name": "p", "kind": "dimse", "url": "http://x/"}]),
         ["a dimse destination is dimse://AET@host:port"]),
    ]
    for raw, needles in cases:
        cfg.write_text(yaml.safe_dump(raw))
        _one_line(medlens("gateway", cfg), "gw.yaml", *needles)
    cfg.write_text(yaml.safe_dump(_config(tmp_path)))
    monkeypatch.delenv("GW_UNIT_KEY", raising=False)
    _one_line(medlens("gateway", cfg), "$GW_UNIT_KEY must hold the site key")
    monkeypatch.setenv("GW_UNIT_KEY", KEY)
    _one_line(medlens("gateway", cfg), "run")  # the rule's run folder does not exist: refused before listening
    _one_line(medlens("gateway", "status", cfg), "no gateway queue here")
    _one_line(medlens("gateway", tmp_path / "missing.yaml"), "missing.yaml")
    assert not (tmp_path / "audit.jsonl").exists()
    # relative paths are the config folder's
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "gw.yaml"
    rel.write_text(yaml.safe_dump(_config(tmp_path, spool="sp", audit="a.jsonl")))
    got = load_gateway_config(rel)
    assert got.spool == tmp_path / "sub" / "sp" and got.queue_path == tmp_path / "sub" / "sp" / "queue.sqlite"


def test_queue_state_machine_is_durable_and_idempotent(tmp_path):
    q = Queue(tmp_path / "q.sqlite")
    assert q.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert q.add_instance("1.2.3", "1.2.4", "1.2.5", str(tmp_path / "a.dcm"), "SENDER", now=100.0)
    assert not q.add_instance("1.2.3", "1.2.4", "1.2.5", str(tmp_path / "a.dcm"), "SENDER", now=101.0)
    assert q.add_instance("1.2.6", "1.2.4", "1.2.5", str(tmp_path / "b.dcm"), "SENDER", now=103.0)
    assert q.due_series(5.0, now=107.0) == [] and q.due_series(5.0, now=108.0) == ["1.2.4"]
    q.route("1.2.4", "xr", ["/runs/a", "/runs/b"])
    q.route("1.2.4", "xr", ["/runs/a"])  # routed again (a restart): no second job
    assert q.add_instance("1.2.7", "1.2.4", "1.2.5", str(tmp_path / "late.dcm"), "SENDER", now=109.0)  # late
    assert q.series_files("1.2.4") == [str(tmp_path / "a.dcm"), str(tmp_path / "b.dcm")]
    assert q.due_series(0.0, now=200.0) == []  # not reopened
    jobs = q.jobs("pending")
    assert [j.run for j in jobs] == ["/runs/a", "/runs/b"]
    q.job_closed(jobs[1].id, "refused", "modality CT")
    q.job_predicted(jobs[0].id, str(tmp_path / "res"), "cnn", "abc", ["pacs", "ehr"])
    q.close()
    q = Queue(tmp_path / "q.sqlite")  # reopened: everything committed is there
    assert {(d.destination, d.attempts) for d in q.due_deliveries()} == {("pacs", 0), ("ehr", 0)}
    assert q.record_attempt(jobs[0].id, "pacs", False, "unreachable", next_at=10**12) is None
    assert [d.destination for d in q.due_deliveries()] == ["ehr"]  # pacs waits for its backoff
    assert q.close_finished_series() == []  # a job still delivering: the series stays, its files too
    assert q.removable_files() == []
    assert q.record_attempt(jobs[0].id, "ehr", True) is None  # pacs still open
    assert q.counts()["jobs"] == {"delivering": 1, "refused": 1}
    assert q.problems()[-1]["reason"] == "unreachable"
    q.db.execute("UPDATE deliveries SET next_at=0")
    latency = q.record_attempt(jobs[0].id, "pacs", True)
    assert latency is not None and latency > 0
    assert q.counts()["jobs"] == {"delivered": 1, "refused": 1}
    assert q.close_finished_series() == ["1.2.4"]
    assert sorted(s for s, _ in q.removable_files()) == ["1.2.3", "1.2.6"]  # not the late one
    q.mark_deleted(["1.2.3", "1.2.6"])
    assert q.depth() == 0 and q.counts()["instances"] == {"spooled": 0, "late": 1}
    assert any(p["state"] == "late instances" and p["id"] == "1.2.4" for p in q.problems())
    n = q.db.execute("SELECT count(*), sum(ok) FROM attempts").fetchone()
    assert n == (3, 2)
    # a series whose job failed is closed as 'failed' and its file is kept (no result was delivered)
    assert q.add_instance("1.3.1", "1.3.2", "1.3.3", str(tmp_path / "c.dcm"), "SENDER", now=200.0)
    q.route("1.3.2", "xr", ["/runs/a"])
    (job,) = q.jobs("pending")
    q.job_closed(job.id, "failed", "RuntimeError: boom")
    assert q.close_finished_series() == [] and q.removable_files() == []
    assert q.counts()["series"] == {"done": 1, "failed": 1} and q.counts()["instances"] == {"spooled": 1, "late": 1}
    (failed,) = [p for p in q.problems() if p["state"] == "failed"]
    at = failed.pop("at")
    assert failed == {"what": "job", "id": "1.3.2", "run": "/runs/a", "state": "failed", "reason": "RuntimeError: boom"}
    assert abs(at - time.time()) < 60  # when it failed (the status page lists the newest first)
    q.close()


def test_routing_takes_the_first_matching_rule_and_says_why_not():
    cfg = GatewayConfig.model_validate(
        {"allowed_aets": ["A"], "spool": "s", "audit": "a", "site_key_env": "K",
         "destinations": [{"name": "p", "kind": "stow", "url": "http://127.0.0.1/dicom-web"}],
         "rules": [{"name": "xr", "match": {"modality": ["dx", "CR"], "body_part": ["CHEST"],
                                            "pixel_spacing_mm": {"min": 0.1, "max": 1.0}}, "runs": ["r1"]},
                   {"name": "ct", "match": {"modality": ["CT"], "slices": {"min": 20},
                                            "series_description": "(?i)lung"}, "runs": ["r2"]}]})
    base = {"modality": "DX", "body_part": "CHEST", "sop_class_uid": "1.2", "series_description": "",
            "pixel_spacing_mm": 0.5, "slices": 1}
    rule, _ = choose_rule(cfg.rules, base)
    assert rule is not None and rule.name == "xr"
    rule, why = choose_rule(cfg.rules, {**base, "pixel_spacing_mm": 2.0})
    assert rule is None and "xr: pixel spacing 2.0 mm outside the rule's range" in why
    rule, why = choose_rule(cfg.rules, {**base, "modality": "CT", "slices": 5, "series_description": "Lung 1mm"})
    assert rule is None and "ct: 5 instance(s), outside the rule's range" in why and "xr: modality CT" in why
    rule, _ = choose_rule(cfg.rules, {**base, "modality": "CT", "slices": 50, "series_description": "Lung 1mm"})
    assert rule is not None and rule.name == "ct"
    rule, why = choose_rule(cfg.rules, {**base, "body_part": ""})
    assert rule is None and "body part unknown not in ['CHEST']" in why


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(0)
    waits = [[backoff(a, 2.0, 60.0, 0.5, rng) for _ in range(200)] for a in range(8)]
    for a, w in enumerate(waits):
        cap = min(60.0, 2.0 * 2 ** a)
        assert cap * 0.5 <= min(w) and max(w) <= cap * 1.5 and len(set(w)) > 100  # jittered, bounded
    medians = [sorted(w)[100] for w in waits]
    assert medians[0] < medians[1] < medians[2] < medians[3] < medians[4] and medians[6] == pytest.approx(60, rel=0.15)
    assert result_uid("sr", "1.2", "run", "abc") == result_uid("sr", "1.2", "run", "abc")
    assert result_uid("sr", "1.2", "run", "abc") != result_uid("sr", "1.2", "run", "abd")
    assert len(result_uid("sr", "1.2", "run", "abc")) <= 64


def _instance(sop: str, series: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SC_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series
    ds.Modality, ds.PatientName, ds.PatientID = "OT", "Unitperson^Zed", "PID-UNIT-1"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(16)
    return ds


def _store(port: int, datasets: list, aet: str = "SENDER") -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(SC_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="GW")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_scp_answers_a700_on_a_failed_write_and_keeps_duplicates_once(tmp_path):
    cfg = GatewayConfig.model_validate(_config(tmp_path))
    q = Queue(cfg.queue_path)
    scp = StoreSCP(cfg, Spool(cfg, q, AuditLog(cfg.audit, KEY.encode()), GatewayMetrics()))
    scp.start()
    try:
        series = generate_uid()
        a, b = _instance(generate_uid(), series), _instance(generate_uid(), series)
        # a write that fails (here the spool's instance folder is a file: ENOTDIR, as a full disk fails a write)
        (cfg.spool / "instances").parent.mkdir(parents=True, exist_ok=True)
        (cfg.spool / "instances").write_text("in the way")
        assert _store(cfg.listen.port, [a]) == [0xA700]
        assert q.counts()["instances"] == {"spooled": 0} and q.counts()["series"] == {}
        assert not [p for p in cfg.spool.rglob("*") if p.name.endswith(".tmp")]
        (cfg.spool / "instances").unlink()
        assert _store(cfg.listen.port, [a, b, a]) == [0, 0, 0]  # the sender retries; a duplicate is fine
        files = sorted(cfg.spool.rglob("*.dcm"))
        assert len(files) == 2 and q.counts()["instances"] == {"spooled": 2}
        assert all(str(a.SOPInstanceUID) not in str(p) and series not in str(p) for p in files)  # names are HMACs
        assert files[0].parent.name == uid_hash(KEY.encode(), series)[:24]
        text = cfg.audit.read_text()
        assert text.count('"received"') == 2 and "Unitperson" not in text and "PID-UNIT-1" not in text
        assert series not in text and uid_hash(KEY.encode(), series) in text
        con = sqlite3.connect(cfg.queue_path)
        assert con.execute("SELECT count(*) FROM instances").fetchone() == (2,)
        con.close()
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(SC_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", cfg.listen.port, ae_title="GW")
        assert assoc.is_rejected
    finally:
        scp.stop()
        q.close()


def test_result_uids_are_fixed_and_the_sr_still_references_its_seg(tmp_path, data_root):
    """Real SR + SEG + FHIR (the LIDC reader nodules of LIDC-IDRI-0001, built by workflow.interop), written twice:
    after ``fix_result_uids`` both copies carry the same SR/SEG UIDs, the SR references the SEG by its new UID,
    the FHIR Bundle names the final SR, and both objects still pass dciodvfy."""
    import json

    import pydicom

    from interop_checks import dciodvfy
    from medlens.gateway.worker import fix_result_uids
    from medlens.workflow.interop import export_nodules

    scan = data_root / "lidc-idri-0001"
    xml = next(scan.rglob("*.xml"))
    uids = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        export_nodules(xml, scan, out, {"sr", "seg", "fhir"})
        (seg0,) = out.glob("*_seg.dcm")
        old_seg = str(pydicom.dcmread(seg0, stop_before_pixels=True).SOPInstanceUID)
        fix_result_uids(out, "1.2.3.4", "run", "abc")
        (sr,), (seg,) = out.glob("*_sr.dcm"), out.glob("*_seg.dcm")
        s, g = pydicom.dcmread(sr), pydicom.dcmread(seg, stop_before_pixels=True)
        assert s.file_meta.MediaStorageSOPInstanceUID == s.SOPInstanceUID
        refs = {str(e.value) for e in s.iterall() if e.tag == (0x0008, 0x1155)}  # ReferencedSOPInstanceUID
        assert str(g.SOPInstanceUID) in refs and old_seg not in refs
        bundle = (next(out.glob("*_fhir.json"))).read_text()
        assert str(s.SOPInstanceUID) in bundle
        json.loads(bundle)
        uids.append((str(s.SOPInstanceUID), str(s.SeriesInstanceUID), str(g.SOPInstanceUID)))
        if k == 0:
            dciodvfy(sr)
            dciodvfy(seg)
    assert uids[0] == uids[1] and len(set(uids[0])) == 3


def test_drift_from_xrays_to_ct_slices_passes_the_threshold_within_the_window(trained_run, data_root):
    """The X-ray run's window fed real PneumoniaMNIST test images (what it was trained on) stays under the PSI
    threshold; then real LIDC CT slices take the input PSI and KS past it within the window. The output drift
    compares the window's probabilities with the run's own test probabilities."""
    import numpy as np

    from medlens.gateway.drift import DriftMonitor, psi, reference_probabilities
    from medlens.run import Predictor, Run

    run = Run.open(trained_run)
    pred = Predictor(run)
    ref = reference_probabilities(trained_run)
    assert ref is not None and len(ref) > 10 and ((0 <= ref) & (ref <= 1)).all()
    mon = DriftMonitor.of_run(run, window=20, min_samples=10)
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        xs = z["test_images"][100:120]
    stats: dict = {}
    for x in xs[:12]:
        prepared = pred.prepare(x)
        p = float(pred.predict_arrays(prepared[None])[0])  # binary: the positive class's probability
        stats = mon.add(mon.input_histogram(prepared), p)
    assert stats["input_psi"] < 0.25 and stats["input_ks"] < 0.3
    assert 0 <= stats["output_ks"] <= 1 and np.isfinite(stats["output_psi"])
    base_ks = stats["input_ks"]
    slices = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[40:60]
    crossed = None
    for i, f in enumerate(slices, start=1):
        stats = mon.add(mon.input_histogram(pred.prepare(pred.load(f), str(f))), None)  # refused: no probability
        if crossed is None and stats["input_psi"] > 0.25:
            crossed = i
    assert crossed is not None and crossed <= 20, stats
    assert stats["input_psi"] > 0.25 and stats["input_ks"] > base_ks + 0.1  # the CDFs apart too
    assert psi(np.ones(4), np.ones(4)) == pytest.approx(0.0, abs=1e-12)


def test_stow_and_fhir_destinations_and_a_refusing_one_given_up(tmp_path, data_root):
    """Delivery to a STOW-RS destination (a real Orthanc of this test's own, DICOMweb) and a FHIR one (a real HTTP
    server here), from real SR + SEG + FHIR results; a FHIR server that answers 422 is retried, then given up
    after retry.max_attempts: the job is 'failed' with the reason and the series' files are kept."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pydicom

    from interop_checks import check_bundle
    from medlens.gateway.queue import Queue
    from medlens.gateway.worker import Worker, fix_result_uids
    from medlens.workflow.interop import export_nodules
    from orthanc import start_orthanc, stop_orthanc

    posted: list[bytes] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.endswith("/refuse"):
                reply, code = {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "processing", "diagnostics": "rejected by the test server"}]}, 422
            else:
                posted.append(body)
                reply, code = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}, 200
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    orthanc, proc = start_orthanc(tmp_path / "orthanc")
    try:
        scan = data_root / "lidc-idri-0001"
        res = tmp_path / "results"
        export_nodules(next(scan.rglob("*.xml")), scan, res, {"sr", "seg", "fhir"})
        fix_result_uids(res, "1.2.3.4", "run", "abc")
        base = f"http://127.0.0.1:{http.server_address[1]}"
        cfg = GatewayConfig.model_validate(_config(tmp_path, destinations=[
            {"name": "archive", "kind": "stow", "url": orthanc.dicomweb},
            {"name": "ehr", "kind": "fhir", "url": f"{base}/fhir"},
            {"name": "bad-ehr", "kind": "fhir", "url": f"{base}/refuse"}],
            retry={"base_s": 0.01, "max_s": 0.02, "max_attempts": 2}))
        q = Queue(cfg.queue_path)
        spooled = tmp_path / "spooled.dcm"
        spooled.write_bytes(b"kept")
        q.add_instance("1.2.3.5", "1.2.3.4", "1.2.3.6", str(spooled), "SENDER")
        q.route("1.2.3.4", "xr", ["/runs/a"])
        (job,) = q.jobs("pending")
        q.job_predicted(job.id, str(res), "cnn", "abc", ["archive", "ehr", "bad-ehr"])
        w = Worker(cfg, q, AuditLog(cfg.audit, KEY.encode()), GatewayMetrics())
        for _ in range(3):
            for d in q.due_deliveries():
                w.deliver(d)
            w.clean_up()
            time.sleep(0.05)
        sr = pydicom.dcmread(next(res.glob("*_sr.dcm")))
        seg = pydicom.dcmread(next(res.glob("*_seg.dcm")), stop_before_pixels=True)
        req = urllib.request.Request(orthanc.base + "/tools/find", method="POST", data=json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": str(sr.StudyInstanceUID)},
             "Expand": True}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(r.read())}
        assert stored == {str(sr.SOPInstanceUID), str(seg.SOPInstanceUID)}
        (body,) = posted
        (tmp_path / "posted.json").write_bytes(body)
        check_bundle(tmp_path / "posted.json", sr)
        states = dict(q.db.execute("SELECT destination, state FROM deliveries").fetchall())
        assert states == {"archive": "done", "ehr": "done", "bad-ehr": "failed"}
        assert q.jobs("failed")[0].id == job.id and q.counts()["series"] == {"failed": 1}
        bad = [p for p in q.problems() if p.get("destination") == "bad-ehr"]
        assert bad[0]["attempts"] == 2 and "HTTP 422" in bad[0]["reason"] and "rejected by the test server" in \
            bad[0]["reason"]
        assert spooled.exists() and res.exists()  # nothing delivered everywhere: files kept
        q.close()
    finally:
        http.shutdown()
        stop_orthanc(proc)


def test_status_page_reasons_name_uids_only_by_their_hash():
    """A UID in a reason (an error text naming an instance) is shown as its audit-trail hash; an IPv4 address (a
    destination) and plain numbers are left as they are."""
    from medlens.gateway.status_page import redact

    key = KEY.encode()
    text = "cannot read 1.2.840.113619.2.55.3.604688 (2.25.987654321) from 10.1.2.3:104 after 0.25 s, try 3"
    shown = redact(text, key)
    assert "1.2.840.113619" not in shown and "2.25.987654321" not in shown
    assert f"uid:{uid_hash(key, '1.2.840.113619.2.55.3.604688')[:12]}" in shown
    assert f"uid:{uid_hash(key, '2.25.987654321')[:12]}" in shown
    assert "10.1.2.3:104" in shown and "0.25 s" in shown and "try 3" in shown
