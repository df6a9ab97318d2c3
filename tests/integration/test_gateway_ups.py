"""The gateway's AIW-I worklist (issue 28, Deliver 3): `medlens gateway CONFIG --ups` as a real process, driven by
an external UPS client in another process (tests/ups_client.py, pynetdicom only), studies sent by dcmtk's
`storescu`, results delivered by C-STORE to dcmtk's `storescp` (the PACS). One gateway for the module (restarted
once, to show the worklist survives), stopped by PID.

Each IHE AIW-I transaction the gateway implements is exercised: RAD-80 create (N-CREATE), RAD-81 query (C-FIND),
RAD-83 get (N-GET), RAD-82 claim and RAD-85 complete (N-ACTION change state; by the gateway and by an external
performer), RAD-84 update (N-SET), RAD-86 subscribe/unsubscribe (N-ACTION), RAD-87 notifications (N-EVENT-REPORT
received by the client), RAD-88 cancel request (N-ACTION); and the refusals of PS3.4 Table CC.1.1-2 with their statuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from gatewayhelp import DX_STORAGE, uid_hash, wait_for, xray_file
from medlens.gateway.config import load_gateway_config
from medlens.gateway.service import run_gateway

REPO = Path(__file__).resolve().parents[2]
MEDLENS = Path(sys.executable).with_name("medlens")
GW_AET, CLIENT_AET = "MEDLENS_GW", "AIREQUESTER"
SITE_KEY = "ups-test-site-key-0123456789abcdef"
NAME, PID = "Worklistson^Quorra", "PID-UPS-731904"  # a distinctive patient, hunted for in every output
DX = UID(DX_STORAGE)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hashed(uid: str) -> str:
    return uid_hash(SITE_KEY, uid)


def xray(folder: Path, pixels: np.ndarray, modality: str = "DX") -> tuple[Path, str, str, str]:
    """A one-image chest X-ray of this module's patient: (file, study, series, SOP Instance UID)."""
    return xray_file(folder, pixels, (NAME, PID), modality)


class World:
    """The PACS (storescp), the gateway and the external client, each a process of its own."""

    def __init__(self, folder: Path, run: Path) -> None:
        self.folder, self.port, self.pacs_port, self.event_port = folder, free_port(), free_port(), free_port()
        self.run = run
        self.pacs_dir = folder / "pacs"
        self.pacs_dir.mkdir()
        self.config = folder / "gateway.yaml"
        self.config.write_text(f"""
listen: {{ae_title: {GW_AET}, host: 127.0.0.1, port: {self.port}}}
allowed_aets: [MODALITY1, {CLIENT_AET}]
quiet_period_s: 1
poll_s: 0.2
spool: spool
audit: audit.jsonl
site_key_env: MEDLENS_TEST_SITE_KEY
rules:
  - name: chest-xray
    match: {{modality: [DX], body_part: [CHEST]}}
    runs: [{run}]
  - name: misrouted-ct
    match: {{series_description: "^MISROUTE"}}
    runs: [{run}]
destinations:
  - {{name: pacs, kind: dimse, url: "dimse://PACS@127.0.0.1:{self.pacs_port}"}}
retry: {{base_s: 0.3, max_s: 1.0, timeout_s: 5}}
ups:
  subscribers: {{{CLIENT_AET}: "127.0.0.1:{self.event_port}"}}
  event_timeout_s: 5
""")
        self.pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(self.pacs_dir), str(self.pacs_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.gateway: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self.client = subprocess.Popen([sys.executable, str(REPO / "tests" / "ups_client.py"), CLIENT_AET, GW_AET,
                                        "127.0.0.1", str(self.port), str(self.event_port)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.client.stdout.readline()) == {"ready": True}  # type: ignore[union-attr]

    def start(self) -> None:
        log = self.folder / f"gateway-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.gateway = subprocess.Popen([str(MEDLENS), "gateway", str(self.config), "--ups"], stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "MEDLENS_TEST_SITE_KEY": SITE_KEY})
        wait_for("the gateway to listen", lambda: "gateway listening" in log.read_text() or self._died(log), 120)

    def _died(self, log: Path) -> bool:
        assert self.gateway is not None
        if self.gateway.poll() is not None:
            raise AssertionError(f"gateway exited ({self.gateway.returncode}): {log.read_text()[-2000:]}")
        return False

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            os.kill(self.gateway.pid, signal.SIGTERM)
            self.gateway.wait(timeout=60)

    def ask(self, op: str, **kw) -> dict:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.client.stdin.flush()
        answer = json.loads(self.client.stdout.readline())
        assert "error" not in answer, answer
        return answer

    def events(self, uid: str) -> list[dict]:
        return [e for e in self.ask("events")["events"] if e["uid"] == uid]

    def states(self, uid: str) -> list[str]:
        return [e["state"] for e in self.events(uid) if e["type"] == 1]

    def send(self, *files: Path) -> None:
        r = subprocess.run(["storescu", "-aet", "MODALITY1", "-aec", GW_AET, "127.0.0.1", str(self.port),
                            *map(str, files)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def audit(self) -> list[dict]:
        return [json.loads(ln) for ln in (self.folder / "audit.jsonl").read_text().splitlines()]

    def pacs_files(self) -> dict[str, pydicom.Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                                      for f in self.pacs_dir.iterdir() if f.is_file())}

    def close(self) -> None:
        self.stop()
        if self.client.poll() is None:
            self.client.stdin.write(json.dumps({"op": "quit"}) + "\n")  # type: ignore[union-attr]
            self.client.stdin.flush()  # type: ignore[union-attr]
            try:
                self.client.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.client.pid, signal.SIGKILL)
        os.kill(self.pacs.pid, signal.SIGTERM)
        self.pacs.wait(timeout=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_run):
    w = World(tmp_path_factory.mktemp("gateway-ups"), trained_run)
    try:
        w.start()
        yield w
    finally:
        w.close()


@pytest.fixture(scope="module")
def xrays(data_root):
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        return z["test_images"][:4]


def _final(world: World, uid: str) -> dict:
    return wait_for(f"work item {uid[-6:]} to end", lambda: (lambda g: g if g["state"] in ("COMPLETED", "CANCELED")
                                                               else None)(world.ask("get", uid=uid)))


def test_a_client_work_item_is_claimed_and_completed_with_the_sr_reference(world, xrays, tmp_path):
    assert world.ask("subscribe")["status"] == 0  # RAD-86, global: every work item's events
    f, study, series, sop = xray(tmp_path, xrays[0])
    uid = generate_uid()
    # RAD-80: the client schedules AI work on a series the gateway has not received yet
    assert world.ask("create", uid=uid, inputs=[[study, series, [[DX, sop]]]])["status"] == 0
    assert world.ask("create", uid=uid, inputs=[[study, series, [[DX, sop]]]])["status"] == 0x0111  # duplicate
    found = world.ask("find", uid=uid)  # RAD-81
    assert found["status"] == 0 and [(m["uid"], m["state"], m["series"]) for m in found["matches"]] == \
        [(uid, "SCHEDULED", [series])]
    assert not found["matches"][0]["has_txn"]
    world.send(f)  # the instances arrive by C-STORE; the gateway claims (RAD-82) and completes (RAD-85) the item
    got = _final(world, uid)
    assert got["status"] == 0 and got["state"] == "COMPLETED", got
    assert not got["has_txn"]  # the gateway's Transaction UID is never given out
    # the output names the SR that the PACS received, in the study it reports on
    pacs = wait_for("the SR in the PACS", world.pacs_files)
    (out_study, _, refs), = got["outputs"]
    (cls, sr_uid), = refs
    assert out_study == study and cls == COMPREHENSIVE_3D_SR
    assert sr_uid in pacs and str(pacs[sr_uid].StudyInstanceUID) == study and pacs[sr_uid].Modality == "SR"
    # RAD-87: the subscriber saw every state, in order, from the gateway
    wait_for("the COMPLETED event", lambda: "COMPLETED" in world.states(uid))
    assert world.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
    assert {e["calling"] for e in world.events(uid)} == {GW_AET}
    # the gateway made no second work item for the series the client had scheduled
    every = world.ask("find")["matches"]
    assert [m["uid"] for m in every if series in m["series"]] == [uid]
    # no PHI in the clear: work item and series named by their HMAC under the site key
    audit = (world.folder / "audit.jsonl").read_text()
    assert hashed(uid) in audit and hashed(series) in audit
    for secret in (uid, series, study, sop, sr_uid, NAME, PID):
        assert secret not in audit and secret not in world.logs[-1].read_text()


def ct_slice(folder: Path, data_root: Path) -> tuple[Path, str]:
    """A real LIDC CT slice as a series of its own (new UIDs, the distinctive patient), described so that the
    'misrouted-ct' rule sends it to the X-ray run, whose out-of-profile gate refuses it; (file, series UID)."""
    ds = pydicom.dcmread(sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[60])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.SeriesDescription = NAME, PID, "MISROUTE ct"
    path = folder / "ct.dcm"
    ds.save_as(path)
    return path, str(ds.SeriesInstanceUID)


def test_the_gateway_schedules_its_own_work_items_and_cancels_with_the_reason(world, xrays, data_root, tmp_path):
    routed, _, routed_series, _ = xray(tmp_path, xrays[1])
    stray, _, stray_series, _ = xray(tmp_path, xrays[2], modality="MG")  # no rule takes a mammogram
    ct, ct_series = ct_slice(tmp_path, data_root)
    world.send(routed, stray, ct)

    def item(series):
        m = [x for x in world.ask("find")["matches"] if series in x["series"]]
        return m[0]["uid"] if m else None

    done, canceled = wait_for("two work items", lambda: item(routed_series)), wait_for("", lambda: item(stray_series))
    assert _final(world, done)["state"] == "COMPLETED"
    got = _final(world, canceled)
    assert got["state"] == "CANCELED" and got["reason"].startswith("unrouted: no routing rule matched"), got
    assert "modality MG" in got["reason"]
    wait_for("the events", lambda: "CANCELED" in world.states(canceled) and "COMPLETED" in world.states(done))
    assert world.states(done) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
    assert world.states(canceled) == ["SCHEDULED", "IN PROGRESS", "CANCELED"]
    (ev,) = [e for e in world.events(canceled) if e["state"] == "CANCELED"]
    assert ev["reason"].startswith("unrouted")
    refused = _final(world, wait_for("the CT's work item", lambda: item(ct_series)))
    assert refused["state"] == "CANCELED" and refused["reason"].startswith(f"{world.run.name}: out of profile: "), \
        refused


def test_a_cancel_request_cancels_a_scheduled_item_and_the_final_states_refuse_it(world, xrays, tmp_path):
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    assert world.ask("create", uid=uid, inputs=[[study, series, [[DX, generate_uid()]]]])["status"] == 0
    assert world.ask("cancel", uid=uid, reason="wrong patient")["status"] == 0  # RAD-88
    got = world.ask("get", uid=uid)
    assert got["state"] == "CANCELED" and got["reason"] == f"cancel requested by {CLIENT_AET}: wrong patient"
    wait_for("the CANCELED event", lambda: "CANCELED" in world.states(uid))
    assert world.states(uid) == ["SCHEDULED", "IN PROGRESS", "CANCELED"]
    assert world.ask("cancel", uid=uid)["status"] == 0xB304  # already CANCELED: a warning
    completed = [m["uid"] for m in world.ask("find", state="COMPLETED")["matches"]]
    assert completed and world.ask("cancel", uid=completed[0])["status"] == 0xC311  # already COMPLETED
    assert world.ask("cancel", uid=generate_uid())["status"] == 0xC307  # unknown work item
    # the series of a work item canceled before it arrived is recorded, not predicted
    f, study, series, sop = xray(tmp_path, xrays[3])
    uid = generate_uid()
    assert world.ask("create", uid=uid, inputs=[[study, series, [[DX, sop]]]])["status"] == 0
    assert world.ask("cancel", uid=uid)["status"] == 0
    world.send(f)
    unrouted = wait_for("the series recorded", lambda: [e for e in world.audit() if e["event"] == "unrouted"
                                                         and e.get("series") == hashed(series)])
    assert unrouted[0]["reason"] == "its work item was canceled before the series was complete"
    assert not [e for e in world.audit() if e["event"] in ("routed", "predicted") and e.get("series") == hashed(series)]
    assert [m["uid"] for m in world.ask("find")["matches"] if series in m["series"]] == [uid]


def test_an_external_performer_goes_through_the_state_table(world):
    uid, txn, other = generate_uid(), generate_uid(), generate_uid()
    assert world.ask("create", uid=uid, inputs=[[generate_uid(), generate_uid(), [[DX, generate_uid()]]]])["status"] == 0
    assert world.ask("subscribe", uid=uid)["status"] == 0  # this one too (its initial state report comes back)
    assert world.ask("state", uid=uid, state="COMPLETED", txn=txn)["status"] == 0xC310  # not yet IN PROGRESS
    assert world.ask("state", uid=uid, state="SCHEDULED", txn=txn)["status"] == 0xC303  # only by N-CREATE
    assert world.ask("state", uid=uid, state="IN PROGRESS", txn=txn)["status"] == 0  # RAD-82: claimed
    assert world.ask("state", uid=uid, state="IN PROGRESS", txn=other)["status"] == 0xC302
    assert world.ask("set", uid=uid, txn=other, values={"ProcedureStepLabel": "x"})["status"] == 0xC301  # RAD-84
    assert world.ask("set", uid=uid, txn=txn, values={"ProcedureStepLabel": "triage done"})["status"] == 0
    assert world.ask("set", uid=uid, txn=txn, values={"ProcedureStepState": "COMPLETED"})["status"] == 0x0106
    assert world.ask("state", uid=uid, state="COMPLETED", txn=other)["status"] == 0xC301
    assert world.ask("state", uid=uid, state="COMPLETED", txn=txn)["status"] == 0xC304  # no performed procedure
    assert world.ask("set", uid=uid, txn=txn, performed=True)["status"] == 0
    assert world.ask("state", uid=uid, state="COMPLETED", txn=txn)["status"] == 0  # RAD-85
    assert world.ask("state", uid=uid, state="COMPLETED", txn=txn)["status"] == 0xB306  # already: a warning
    assert world.ask("set", uid=uid, txn=txn, values={"ProcedureStepLabel": "y"})["status"] == 0xC300
    assert world.ask("state", uid=uid, state="CANCELED", txn=txn)["status"] == 0xC300
    got = world.ask("get", uid=uid)  # RAD-83
    assert got["state"] == "COMPLETED" and not got["has_txn"]
    wait_for("the COMPLETED event", lambda: "COMPLETED" in world.states(uid))
    # created (global subscription), the initial report of the item's own subscription, then one report per
    # change though the client is subscribed twice (globally and to the item)
    assert world.states(uid) == ["SCHEDULED", "SCHEDULED", "IN PROGRESS", "COMPLETED"]
    assert world.ask("unsubscribe", uid=uid)["status"] == 0  # RAD-86


def test_bad_requests_get_their_status(world):
    study, series = generate_uid(), generate_uid()
    ok = [[study, series, [[DX, generate_uid()]]]]
    assert world.ask("create", uid=generate_uid(), inputs=ok, state="IN PROGRESS")["status"] == 0xC309
    assert world.ask("create", uid=generate_uid(), inputs=ok, txn=generate_uid())["status"] == 0x0106
    assert world.ask("create", uid=generate_uid(), inputs=[[study, "1.2.03.x", []]])["status"] == 0x0106
    assert world.ask("create", uid=generate_uid(), inputs=ok + [[study, generate_uid(), []]])["status"] == 0x0106
    assert world.ask("create", uid=generate_uid(), inputs=[])["status"] == 0x0120
    assert world.ask("create", uid=generate_uid(), inputs=ok, priority="URGENT")["status"] == 0x0106
    assert world.ask("get", uid=generate_uid())["status"] == 0xC307
    assert world.ask("set", uid=generate_uid(), values={"ProcedureStepLabel": "x"})["status"] == 0xC307
    assert world.ask("state", uid=generate_uid(), state="IN PROGRESS", txn=generate_uid())["status"] == 0xC307
    assert world.ask("subscribe", aet="NOBODY")["status"] == 0xC308  # no address for that AE
    # the same AE-title allow-list as C-STORE: a stranger is rejected at association
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context("1.2.840.10008.5.1.4.34.6.1")
    assoc = ae.associate("127.0.0.1", world.port, ae_title=GW_AET)
    assert assoc.is_rejected
    assert world.gateway is not None and world.gateway.poll() is None  # no request brought it down


def test_the_worklist_and_subscriptions_survive_a_restart(world, monkeypatch):
    """The gateway process stopped, a new gateway on the same files (in this process: one more process start
    would cost 6 s of CPU) answers the same worklist, and the client's global subscription still holds."""
    before = {m["uid"]: m["state"] for m in world.ask("find")["matches"]}
    assert len(before) >= 5
    world.stop()
    cfg = load_gateway_config(world.config)
    stop, up = threading.Event(), threading.Event()
    monkeypatch.setenv("MEDLENS_TEST_SITE_KEY", SITE_KEY)
    t = threading.Thread(target=run_gateway, args=(cfg, stop), kwargs={"ready": lambda _l: up.set()}, daemon=True)
    t.start()
    try:
        assert up.wait(60), "the gateway did not start again"
        after = {m["uid"]: m["state"] for m in world.ask("find")["matches"]}
        assert after == before
        uid = generate_uid()
        assert world.ask("create", uid=uid, inputs=[[generate_uid(), generate_uid(), [[DX, generate_uid()]]]]) == \
            {"status": 0}
        wait_for("the new item's event", lambda: world.states(uid))
        assert world.states(uid) == ["SCHEDULED"]
        # RAD-86: unsubscribed, no report; events go out in order, so once a later item's report (subscribed
        # again) has arrived, one for the item made in between would have arrived before it
        assert world.ask("unsubscribe")["status"] == 0
        unseen, seen = generate_uid(), generate_uid()
        assert world.ask("create", uid=unseen, inputs=[[generate_uid(), generate_uid(), []]])["status"] == 0
        assert world.ask("subscribe")["status"] == 0
        assert world.ask("create", uid=seen, inputs=[[generate_uid(), generate_uid(), []]])["status"] == 0
        wait_for("the later item's event", lambda: world.states(seen))
        assert world.states(unseen) == ["SCHEDULED"]  # only the initial report of the new global subscription
    finally:
        stop.set()
        t.join(60)


def test_bad_worklist_settings_are_one_line_errors_before_anything_is_written(trained_run, tmp_path, monkeypatch):
    from clirun import medlens

    monkeypatch.setenv("MEDLENS_TEST_SITE_KEY", SITE_KEY)
    base = f"""listen: {{ae_title: GW, host: 127.0.0.1, port: {free_port()}}}
allowed_aets: [{CLIENT_AET}]
spool: spool
audit: audit.jsonl
site_key_env: MEDLENS_TEST_SITE_KEY
rules: [{{name: xr, runs: [{trained_run}]}}]
destinations: [{{name: pacs, kind: dimse, url: "dimse://PACS@127.0.0.1:104"}}]
"""
    cfg = tmp_path / "gw.yaml"
    for ups, needle in (("{subscribers: {A: nowhere}}", "'nowhere' is not host:port"),
                        ("{subscribers: {A: '127.0.0.1:70000'}}", "is not host:port"),
                        ("{subscribers: {'A\\\\B': '127.0.0.1:104'}}", "not a DICOM AE title"),
                        ("{event_timeout_s: 0}", "event_timeout_s"),
                        ("{subscribers: {A: '10.9.8.7:104'}}", "DIMSE to another host is not encrypted")):
        cfg.write_text(base + f"ups: {ups}\n")
        r = medlens("gateway", cfg)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "gw.yaml" in lines[0] and needle in lines[0], r.stderr
    assert not (tmp_path / "spool").exists() and not (tmp_path / "audit.jsonl").exists()
