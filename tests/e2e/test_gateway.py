"""The clinical AI gateway (issue 28) end to end: `medlens gateway CONFIG` as a real process (stopped by PID),
studies sent to it by dcmtk's `storescu`, results delivered by C-STORE into a real Orthanc (tests/orthanc.py)
through a TCP relay the tests can stop and start (the destination going down and coming back up).

One gateway serves the module; the kill -9 test replaces it (a killed process, a restart that exits by fault
injection right after Orthanc confirmed a store and before recording it, a plain restart), and the last one is
stopped by PID at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from gatewayhelp import uid_hash, wait_for
from gatewayhelp import xray_file as _xray_file
from interop_checks import dciodvfy
from orthanc import free_port, orthanc  # noqa: F401  (session fixture: a real Orthanc, stopped by PID)
from test_cli import medlens

NAME, PID = "Gatewayson^Quillanova", "PID-GW-580217"  # a distinctive patient, to hunt for in every output
SITE_KEY = "test-site-key-0123456789abcdef"
API_KEY = "gateway-test-api-key-abcdefghijklmnop"
GW_AET = "MEDLENS_GW"
MEDLENS = Path(sys.executable).with_name("medlens")


# ------------------------------------------------------------------------------------------ inputs


def xray_file(folder: Path, pixels: np.ndarray) -> tuple[Path, str, str]:
    """A one-image DX chest study of this module's patient: (file, study UID, series UID)."""
    return _xray_file(folder, pixels, (NAME, PID))[:3]


@pytest.fixture(scope="module")
def xrays(data_root):
    """Real PneumoniaMNIST test images (28 px, what the tiny run was trained on)."""
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        return z["test_images"][:8]


def ct_file(folder: Path, data_root: Path, description: str) -> tuple[Path, str]:
    """A real LIDC CT slice as a study of its own (new UIDs), of the distinctive patient; (file, series UID)."""
    src = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[60]
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.SeriesDescription = NAME, PID, description
    path = folder / f"ct_{description}.dcm"
    ds.save_as(path)
    return path, str(ds.SeriesInstanceUID)


# ------------------------------------------------------------------------------------------ the relay


class Relay:
    """A TCP relay on a fixed port to Orthanc's DICOM port: the gateway's destination, which the tests take
    down (nothing listens) and bring back up."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(8)
        self.sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        for c in self.conns:
            c.close()
        self.conns = []


# ------------------------------------------------------------------------------------------ the gateway


class Gateway:
    def __init__(self, folder: Path, run: Path, relay: Relay) -> None:
        self.folder, self.port, self.stow_port = folder, free_port(), free_port()
        self.config = folder / "gateway.yaml"
        self.config.write_text(f"""
listen: {{ae_title: {GW_AET}, host: 127.0.0.1, port: {self.port}}}
allowed_aets: [MODALITY1, ORTHANC]
quiet_period_s: 2
poll_s: 0.2
spool: spool
audit: audit.jsonl
site_key_env: MEDLENS_TEST_SITE_KEY
metrics: {{host: 127.0.0.1, port: 0}}
stow: {{host: 127.0.0.1, port: {self.stow_port}}}
rules:
  - name: chest-xray
    match: {{modality: [DX, CR], body_part: [CHEST]}}
    runs: [{run}]
  - name: misrouted-ct
    match: {{series_description: "^MISROUTE"}}
    runs: [{run}]
destinations:
  - {{name: pacs, kind: dimse, url: "dimse://ORTHANC@127.0.0.1:{relay.port}"}}
retry: {{base_s: 0.3, max_s: 1.0, timeout_s: 5}}
drift: {{window: 4, min_samples: 1, psi_alert: 0.25}}
""")
        self.proc: subprocess.Popen | None = None
        self.metrics_url: str | None = None
        self.logs: list[Path] = []  # one per start

    def env(self, **extra) -> dict:
        return {**os.environ, "MEDLENS_TEST_SITE_KEY": SITE_KEY, "MEDLENS_API_KEYS": API_KEY, **extra}

    @property
    def log(self) -> Path:
        return self.logs[-1]

    def start(self, **extra_env) -> subprocess.Popen:
        self.logs.append(self.folder / f"gateway-{len(self.logs) + 1}.log")
        out = open(self.log, "wb")
        self.proc = subprocess.Popen([str(MEDLENS), "gateway", str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(**extra_env), start_new_session=True)
        out.close()  # the child holds its own copy
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            m = re.search(r"metrics at (http://\S+/metrics)", self.log.read_text())
            if m:
                self.metrics_url = m.group(1)
                return self.proc
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("gateway did not start in 90 s")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def send(self, *files: Path, aet: str = "MODALITY1") -> subprocess.CompletedProcess:
        return subprocess.run(["storescu", "-aet", aet, "-aec", GW_AET, "127.0.0.1", str(self.port),
                               *map(str, files)], capture_output=True, text=True, timeout=60)

    def db(self, sql: str, args=()) -> list[tuple]:
        con = sqlite3.connect(self.folder / "spool" / "queue.sqlite", timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def audit(self) -> list[dict]:
        p = self.folder / "audit.jsonl"
        return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []


def hashed(uid: str) -> str:
    return uid_hash(SITE_KEY, uid)


def metric(gw: Gateway, name: str, **labels) -> float | None:
    """A sample of the gateway's /metrics (Prometheus text), or None when absent."""
    text = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for ln in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", ln)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return None


def srs_in_orthanc(orthanc, study: str) -> list[str]:  # noqa: F811
    """Orthanc's SR instances of a study (its REST API), by SOP Instance UID."""
    req = urllib.request.Request(orthanc.base + "/tools/find", method="POST", data=json.dumps(
        {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}, "Expand": True}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(r.read())]


@pytest.fixture(scope="module")
def relay(orthanc):  # noqa: F811
    r = Relay(orthanc.dicom_port)
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, trained_run, relay):
    g = Gateway(tmp_path_factory.mktemp("gateway"), trained_run, relay)
    g.start()
    yield g
    g.kill(signal.SIGTERM)


# ------------------------------------------------------------------------------------------ tests


def test_an_xray_study_comes_back_as_an_sr_in_the_pacs(gw, orthanc, xrays, trained_run, tmp_path):  # noqa: F811
    import highdicom as hd

    from medlens.run import Predictor, Run

    f, study, series = xray_file(tmp_path, xrays[0])
    r = gw.send(f)
    assert r.returncode == 0, r.stderr
    (sop,) = wait_for("the SR in Orthanc", lambda: srs_in_orthanc(orthanc, study))
    meta = urllib.request.urlopen(f"{orthanc.base}/tools/lookup", data=sop.encode(), timeout=10).read()
    orthanc_id = json.loads(meta)[0]["ID"]
    back = tmp_path / "back_sr.dcm"
    back.write_bytes(urllib.request.urlopen(f"{orthanc.base}/instances/{orthanc_id}/file", timeout=10).read())
    dciodvfy(back)
    run = Run.open(trained_run)
    expected = Predictor(run).predict_files([str(f)])[0]
    positive = run.class_names[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = hd.sr.srread(back)
        (group,) = sr.content.get_image_measurement_groups()
    probs = [m.value for m in group.get_measurements() if m.name.meaning == "Probability"]
    assert probs == [pytest.approx(expected.probabilities[positive], abs=1e-6)]
    assert group.finding_type.meaning == positive
    qe = group.get_qualitative_evaluations()[0]
    assert qe.value.meaning == ("Present" if expected.prediction == positive else "Absent")
    assert sr.StudyInstanceUID == study and sr.PatientID == PID  # filed under the patient's study
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == series
    # the queue: the series done, its job delivered, its spooled file deleted
    wait_for("the series done", lambda: gw.db("SELECT state FROM series WHERE series_uid=?", (series,)) == [("done",)])
    assert gw.db("SELECT state FROM jobs WHERE series_uid=?", (series,)) == [("delivered",)]
    # the clean-up follows the series' closing in the same worker pass, not in its transaction
    wait_for("the spool emptied", lambda: not list((gw.folder / "spool" / "instances").rglob("*.dcm")))
    text = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
    label = f'run="{trained_run.name}"'
    assert re.search(r"medlens_gateway_delivered_series_total\{" + re.escape(label) + r"\} [1-9]", text)
    assert re.search(r"medlens_gateway_arrival_to_delivery_seconds_count\{" + re.escape(label) + r"\} [1-9]", text)
    assert "medlens_gateway_queue_depth" in text


def _orthanc_call(orthanc, method: str, path: str, body: bytes) -> dict | list | str:  # noqa: F811
    req = urllib.request.Request(orthanc.base + path, data=body, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
    try:
        return json.loads(text)
    except ValueError:
        return text.decode()


def test_orthanc_forwards_a_study_to_the_gateway_and_gets_the_sr_back(gw, orthanc, xrays, tmp_path):  # noqa: F811
    """The README's round trip: the gateway declared as a DICOM modality of Orthanc, a study uploaded to Orthanc
    and sent on with /modalities/medlens/store; the SR comes back into the same study."""
    f, study, _ = xray_file(tmp_path, xrays[4])
    stored = _orthanc_call(orthanc, "POST", "/instances", f.read_bytes())
    assert isinstance(stored, dict)
    _orthanc_call(orthanc, "PUT", "/modalities/medlens", json.dumps([GW_AET, "127.0.0.1", gw.port]).encode())
    _orthanc_call(orthanc, "POST", "/modalities/medlens/store", stored["ParentStudy"].encode())
    (sop,) = wait_for("the SR of the forwarded study", lambda: srs_in_orthanc(orthanc, study))
    received = [e for e in gw.audit() if e["event"] == "received" and e["study"] == hashed(study)]
    assert [e["calling_aet"] for e in received] == ["ORTHANC"]
    assert sop.startswith("2.25.")  # the gateway's UID, fixed by series, run and weights


def test_a_study_stored_by_stow_rs_on_the_serve_app_comes_back_as_an_sr(gw, orthanc, xrays, tmp_path):  # noqa: F811
    """STOW-RS (dicomweb-client, a real DICOMweb client) to the serve app's /studies: refused without the API key
    (nothing kept), stored with it, and answered like a C-STORE: the SR arrives in Orthanc."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    f, study, series = xray_file(tmp_path, xrays[5])
    ds = pydicom.dcmread(f)
    url = f"http://127.0.0.1:{gw.stow_port}"
    boundary = "medlens-test-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + f.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    r = requests.post(f"{url}/studies", data=body, timeout=30,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 401
    assert gw.db("SELECT count(*) FROM instances WHERE series_uid=?", (series,)) == [(0,)]
    answer = DICOMwebClient(url, headers={"X-API-Key": API_KEY}).store_instances([ds])
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [str(ds.SOPInstanceUID)]
    assert "FailedSOPSequence" not in answer
    wait_for("the SR of the study stored by STOW-RS", lambda: srs_in_orthanc(orthanc, study))
    received = [e for e in gw.audit() if e["event"] == "received" and e["series"] == hashed(series)]
    assert [e["calling_aet"] for e in received] == ["STOW-RS"]
    r = requests.post(f"{url}/studies", data=b"not multipart", timeout=30,
                      headers={"X-API-Key": API_KEY, "Content-Type": "application/dicom"})
    assert r.status_code == 415


def test_a_ct_slice_is_not_sent_through_the_xray_model(gw, orthanc, data_root, trained_run, tmp_path):  # noqa: F811
    """No rule matches a CT slice (unrouted); one sent with a description a rule routes to the X-ray model by
    mistake is refused by the out-of-profile gate. Both recorded with the reason, in the queue and the audit
    trail; nothing reaches Orthanc."""
    plain, plain_series = ct_file(tmp_path, data_root, "CHEST CT")
    mis, mis_series = ct_file(tmp_path, data_root, "MISROUTE")
    for f in (plain, mis):
        assert gw.send(f).returncode == 0
    wait_for("the CT series recorded", lambda: gw.db(
        "SELECT 1 FROM jobs WHERE series_uid=? AND state='refused'", (mis_series,)), 90)
    (state, reason), = gw.db("SELECT state, reason FROM series WHERE series_uid=?", (plain_series,))
    assert state == "unrouted" and "chest-xray: modality CT not in ['DX', 'CR']" in reason
    (reason,), = gw.db("SELECT reason FROM jobs WHERE series_uid=?", (mis_series,))
    assert "modality CT" in reason and "trained on DX" in reason
    assert gw.db("SELECT count(*) FROM jobs WHERE series_uid=?", (plain_series,)) == [(0,)]
    events = {(e["event"], e.get("series")) for e in gw.audit()}
    assert ("unrouted", hashed(plain_series)) in events and ("refused", hashed(mis_series)) in events
    for f in (plain, mis):
        study = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        assert srs_in_orthanc(orthanc, study) == []
    # the drift gauges are exposed per run (the crossing itself: tests/integration/test_gateway_parts.py)
    for stat in ("input_psi", "input_ks", "output_psi", "output_ks"):
        v = metric(gw, "medlens_gateway_drift", run=trained_run.name, stat=stat)
        assert v is not None and v >= 0, stat
    r = medlens("gateway", "status", gw.config, env=gw.env())
    assert r.returncode == 0, r.stderr
    assert f"series {hashed(plain_series)[:12]}: unrouted: no routing rule matched" in r.stdout
    assert f"job {hashed(mis_series)[:12]} -> {trained_run.name}: refused: modality CT" in r.stdout


def test_an_ae_title_not_on_the_allow_list_is_refused(gw, xrays, tmp_path):
    f, _, series = xray_file(tmp_path, xrays[1])
    r = gw.send(f, aet="INTRUDER")
    assert r.returncode != 0 and "Association Rejected" in (r.stdout + r.stderr)
    assert gw.db("SELECT count(*) FROM instances WHERE series_uid=?", (series,)) == [(0,)]


def test_a_destination_down_then_up_gets_the_result_once(gw, relay, orthanc, xrays, tmp_path):  # noqa: F811
    relay.stop()
    try:
        f, study, series = xray_file(tmp_path, xrays[2])
        assert gw.send(f).returncode == 0
        wait_for("a failed delivery attempt", lambda: gw.db(
            "SELECT 1 FROM deliveries d JOIN jobs j ON j.id=d.job_id WHERE j.series_uid=? AND d.attempts >= 2 "
            "AND d.state='pending'", (series,)), 90)
        r = medlens("gateway", "status", gw.config, env=gw.env())
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"delivery {hashed(series)[:12]}"))
        assert "to pacs" in line and ": pending: " in line and "unreachable" in line
        assert re.search(r"deliveries\s+.?\s*pending\s+.?\s*1", r.stdout)
        assert srs_in_orthanc(orthanc, study) == []
        assert list((gw.folder / "spool" / "instances").rglob("*.dcm"))  # kept until delivered
    finally:
        relay.start()
    wait_for("the SR after the destination came back", lambda: srs_in_orthanc(orthanc, study), 60)
    wait_for("the delivery recorded", lambda: gw.db("SELECT state FROM jobs WHERE series_uid=?", (series,))
             == [("delivered",)])
    assert len(srs_in_orthanc(orthanc, study)) == 1
    failed = [e for e in gw.audit() if e["event"] == "delivery_failed" and e["series"] == hashed(series)]
    assert len(failed) >= 2 and all("unreachable" in e["error"] for e in failed)


def test_kill_9_then_restart_delivers_exactly_once(gw, orthanc, xrays, tmp_path):  # noqa: F811
    f, study, series = xray_file(tmp_path, xrays[3])
    assert gw.send(f).returncode == 0  # answered only once spooled and recorded
    gw.kill()  # within the 2 s quiet period: received, nothing predicted or sent
    assert gw.db("SELECT count(*) FROM instances WHERE series_uid=?", (series,)) == [(1,)]
    assert gw.db("SELECT count(*) FROM jobs WHERE series_uid=?", (series,)) == [(0,)]
    assert srs_in_orthanc(orthanc, study) == []
    # restart; it exits (fault injection) right after Orthanc confirmed the SR, before recording the delivery
    proc = gw.start(MEDLENS_GATEWAY_EXIT_AFTER_SEND="1")
    assert proc.wait(timeout=90) == 86
    (first,) = srs_in_orthanc(orthanc, study)
    assert gw.db("SELECT d.state FROM deliveries d JOIN jobs j ON j.id=d.job_id WHERE j.series_uid=?",
                 (series,)) == [("pending",)]
    assert list((gw.folder / "spool" / "instances").rglob("*.dcm"))  # not delivered as far as it knows: kept
    gw.start()  # sends again: the same SOP Instance UID, which Orthanc keeps once
    wait_for("the delivery recorded", lambda: gw.db("SELECT state FROM jobs WHERE series_uid=?", (series,))
             == [("delivered",)], 90)
    assert srs_in_orthanc(orthanc, study) == [first]
    assert gw.db("SELECT count(*) FROM jobs WHERE series_uid=?", (series,)) == [(1,)]
    wait_for("the spool emptied", lambda: not list((gw.folder / "spool" / "instances").rglob("*.dcm")))


def test_the_audit_trail_holds_no_phi_and_no_raw_uids(gw, trained_run):
    from medlens.run import Run

    text = (gw.folder / "audit.jsonl").read_text()
    events = gw.audit()
    kinds = {e["event"] for e in events}
    assert {"received", "routed", "predicted", "refused", "unrouted", "delivered", "delivery_failed"} <= kinds
    assert NAME not in text and NAME.split("^")[0] not in text and PID not in text
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text), "a raw DICOM UID in the audit trail"
    received = [e for e in events if e["event"] == "received"]
    assert all(e["calling_aet"] in ("MODALITY1", "ORTHANC", "STOW-RS") and re.fullmatch("[0-9a-f]{32}", e["instance"])
               for e in received)
    predicted = [e for e in events if e["event"] == "predicted"]
    assert all(e["weights_sha256"] == Run.open(trained_run).weights_sha256 for e in predicted)
    routed = [e for e in events if e["event"] == "routed"]
    assert {e["rule"] for e in routed} == {"chest-xray", "misrouted-ct"}
    # a clean stop on SIGTERM; the console held one line per outcome and nothing of the libraries'
    gw.kill(signal.SIGTERM)
    assert gw.proc is not None and gw.proc.returncode == 0
    assert gw.log.read_text().splitlines()[-1] == "gateway stopped"
    outcomes = []
    for log in gw.logs:  # every start: the one killed, the one that exited after a send, the last one
        lines = log.read_text().splitlines()
        assert re.fullmatch(r"gateway listening as MEDLENS_GW@127\.0\.0\.1:\d+, metrics at \S+, STOW-RS at "
                            r"http://127\.0\.0\.1:\d+/studies", lines[0]), lines
        outcomes += [ln for ln in lines[1:] if ln != "gateway stopped" and not ln.startswith("drift alert: ")]
        assert NAME not in "".join(lines) and PID not in "".join(lines)
    for ln in outcomes:
        assert re.fullmatch(r"series [0-9a-f]{12}( -> \S+)?: (delivered|refused|not routed|failed).*", ln), ln
    assert len([ln for ln in outcomes if ": delivered (" in ln]) == 5  # the studies of the tests, each once
