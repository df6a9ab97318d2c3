"""The gateway's status page (issue 28, Deliver 4 and the drift Done-when): `medlens gateway CONFIG` as a real
process, fed by C-STORE a stream that shifts from chest X-rays (real PneumoniaMNIST test images, what the tiny run
was trained on) to real LIDC CT slices; the input drift passes its PSI threshold within the window, and the page,
loaded in headless Chromium behind the serve app's API key, shows the alert (screenshot under tmp_path), while a
hostile routing-rule name is shown as text, never run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from orthanc import free_port
from gatewayhelp import DX_STORAGE
from test_gateway import MEDLENS, NAME, PID, xray_file

SITE_KEY = "status-site-key-0123456789abcdef"
API_KEY = "status-page-api-key-abcdefghijklmnop"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HOSTILE = '<script>pwned=1</script><img src=x onerror="pwned=2">'  # a rule name (64 characters at most)
N_XRAY, N_CT, WINDOW, PSI_ALERT = 12, 20, 20, 0.25


def _ct_files(folder: Path, data_root: Path) -> list[Path]:
    """Real LIDC slices, each a series of its own (new UIDs) of the distinctive patient."""
    out = []
    for i, src in enumerate(sorted((data_root / "lidc-idri-0001").rglob("*.dcm"))[40:40 + N_CT]):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID = NAME, PID
        out.append(folder / f"ct{i:02d}.dcm")
        ds.save_as(out[-1])
    return out


def _get(url: str, key: str | None = API_KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_status_page_shows_the_drift_alert_from_xrays_to_ct(tmp_path, trained_run, data_root, browser):
    from medlens.gateway.drift import DriftMonitor, psi
    from medlens.run import Predictor, Run

    port, http_port, dead_pacs = free_port(), free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "listen": {"ae_title": "GW", "host": "127.0.0.1", "port": port}, "allowed_aets": ["MODALITY1"],
        "quiet_period_s": 0.5, "poll_s": 0.2, "spool": "spool", "audit": "audit.jsonl",
        "site_key_env": "MEDLENS_STATUS_SITE_KEY", "stow": {"host": "127.0.0.1", "port": http_port},
        "rules": [{"name": HOSTILE, "match": {"modality": ["MR"]}, "runs": [str(trained_run)]},
                  {"name": "xray-and-ct", "match": {"modality": ["DX", "CT"]}, "runs": [str(trained_run)]}],
        "destinations": [{"name": "pacs", "kind": "dimse", "url": f"dimse://PACS@127.0.0.1:{dead_pacs}"}],
        "retry": {"base_s": 60, "max_s": 60, "timeout_s": 2},
        "drift": {"window": WINDOW, "min_samples": 10, "psi_alert": PSI_ALERT, "ks_alert": 0.3}}))
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        xs = z["test_images"][100:100 + N_XRAY]
    (tmp_path / "in").mkdir()
    xray_paths = [xray_file(tmp_path / "in", x)[0] for x in xs]
    ct_paths = _ct_files(tmp_path / "in", data_root)
    other, _, _ = xray_file(tmp_path / "in", xs[0])  # a modality no rule takes: unrouted, its reason shown
    ds = pydicom.dcmread(other)
    ds.Modality = "OT"
    ds.save_as(other)

    log = tmp_path / "gateway.log"
    env = {**os.environ, "MEDLENS_STATUS_SITE_KEY": SITE_KEY, "MEDLENS_API_KEYS": API_KEY}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MEDLENS), "gateway", str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _get(base + "/gateway/status.json")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        # behind the serve app's API keys: nothing without one
        assert _get(base + "/gateway/status", key=None)[0] == 401
        assert _get(base + "/gateway/status.json", key="wrong-key-wrong-key-wrong")[0] == 401

        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(DX_STORAGE, "1.2.840.10008.1.2.1")
        ae.add_requested_context(CT_STORAGE, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate("127.0.0.1", port, ae_title="GW")
        assert assoc.is_established
        try:  # the X-rays first, then the CT slices: the stream shifts
            for f in [*xray_paths, *ct_paths, other]:
                st = assoc.send_c_store(pydicom.dcmread(f))
                assert st.Status == 0, (f.name, st)
        finally:
            assoc.release()

        n_series = N_XRAY + N_CT + 1
        deadline = time.monotonic() + 120
        while True:
            snap = json.loads(_get(base + "/gateway/status.json")[1])
            s = snap["summary"]
            tried = sum(p["what"] == "delivery" for p in snap["problems"])  # first attempts made (PACS down)
            # every series routed or not (the OT one is sent last, so it may be decided last), every routed one settled
            if s["received"] == n_series and s["routed"] + s["unrouted"] == n_series \
                    and s["refused"] + s["delivering"] + s["done"] + s["failed"] == s["routed"] and tried == s["delivering"]:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (snap["summary"], log.read_text())
            time.sleep(0.5)
        assert s["unrouted"] == 1 and s["routed"] == n_series - 1 and snap["queue_depth"] == s["delivering"]
        (run,) = snap["drift"]
        assert run["run"] == Path(trained_run).name and run["seen"] == N_XRAY + N_CT
        hist = dict((n, st) for n, st in run["history"])
        # the X-ray part stays under the threshold; the CT slices take the input PSI past it within the window
        assert hist[N_XRAY]["input_psi"] < PSI_ALERT
        crossed = min(n for n, st in hist.items() if st.get("input_psi", 0) > PSI_ALERT)
        assert N_XRAY < crossed <= N_XRAY + WINDOW, crossed
        assert run["alert"] and "input_psi" in run["alerting"] and run["stats"]["input_psi"] > PSI_ALERT

        # the window's PSI recomputed here from the last WINDOW series sent (all CT slices), independently
        r = Run.open(trained_run)
        pred, mon = Predictor(r), DriftMonitor.of_run(Run.open(trained_run), WINDOW, 10)
        hs = [mon.input_histogram(pred.prepare(pred.load(f), str(f))) for f in ct_paths]
        assert mon.hist_ref is not None
        expected = psi(np.mean(np.stack(hs), axis=0), mon.hist_ref)
        assert run["stats"]["input_psi"] == pytest.approx(expected, rel=1e-3)

        ctx = browser.new_context(extra_http_headers={"X-API-Key": API_KEY})
        page = ctx.new_page()
        resp = page.goto(base + "/gateway/status")
        assert resp is not None and resp.status == 200
        shot = tmp_path / "gateway-status.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        alert = page.text_content(".alert") or ""
        assert "DRIFT ALERT" in alert and Path(trained_run).name in alert, alert
        m = re.search(r"input psi (\d+\.\d+) > 0\.25", alert)
        assert m and float(m.group(1)) > PSI_ALERT and float(m.group(1)) == pytest.approx(expected, abs=1e-3), alert
        row = page.locator("table.stats tr", has_text="input psi")
        assert "alert" in (row.text_content() or "")
        assert page.locator(f".run[data-run='{Path(trained_run).name}'] svg polyline").count() >= 2  # the plots
        assert page.text_content("td[data-state='unrouted']") == "1"
        assert page.text_content("td[data-state='refused']") == str(s["refused"])
        # the hostile rule name is text, in the rules table and in the unrouted series' reason, and nothing ran
        assert HOSTILE in (page.text_content("#rules") or "")
        assert any(HOSTILE in (t or "") for t in page.locator("#problems td.reason").all_text_contents())
        assert page.evaluate("typeof window.pwned") == "undefined"
        assert page.locator("img").count() == 0 and page.locator("body script").count() == 0
        # no PHI: neither the patient nor any series UID appears; series are named by their hash
        html = page.content() + json.dumps(snap)
        for f in [*xray_paths, *ct_paths, other]:
            assert str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) not in html
        assert NAME not in html and PID not in html and "Gatewayson" not in html
        down = page.locator("#problems tr", has_text="delivery to pacs")  # the PACS is down: retried, shown
        assert down.count() == N_XRAY and f"127.0.0.1:{dead_pacs}" in (down.first.text_content() or "")
        ctx.close()

        # a browser without the header: 401, then the serve app's login at / opens a session the page accepts
        ctx = browser.new_context()
        page = ctx.new_page()
        resp = page.goto(base + "/gateway/status")
        assert resp is not None and resp.status == 401 and "DRIFT ALERT" not in page.content()
        page.goto(base + "/")
        page.fill("#key", API_KEY)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        resp = page.goto(base + "/gateway/status")
        assert resp is not None and resp.status == 200 and "DRIFT ALERT" in (page.text_content(".alert") or "")
        ctx.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
