"""Load benchmark of ``medlens gateway`` (issue 28 item 7): N one-image X-ray studies pushed by C-STORE (dcmtk
``storescu``) at a fixed rate to a gateway process on this machine, results delivered by C-STORE into a real
Orthanc (tests/orthanc.py).

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/gateway.py --run RUN [--n 200] [--rate 2]
    .venv/bin/python benchmarks/gateway.py --n 40          # trains the tests' tiny PneumoniaMNIST run first

Prints throughput (studies delivered per second, first send to last delivery), arrival-to-delivery latency
p50/p95/p99 (the gateway's own queue: a series' first arrival to its last delivery confirmed), the peak queue
depth (sampled from the gateway's /metrics every 0.25 s), the gateway's RSS at the start and at the end
(/proc/PID/status), and lost / duplicated: studies without an SR in Orthanc that the gateway did not record as
refused (out of profile: a real test image can fall outside the training profile) or unrouted, and studies with
more than one SR.
Inputs are PneumoniaMNIST test images as DX DICOM files (tests/e2e/test_gateway.py: xray_file), cycled; each
study is new (new UIDs). Sender, gateway and Orthanc share this machine's cores; every figure is this run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "e2e")]

from orthanc import free_port, start_orthanc, stop_orthanc  # noqa: E402
from test_gateway import xray_file  # noqa: E402


def rss_mb(pid: int) -> float:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1]) / 1024
    return float("nan")


def srs_of(base: str, study: str) -> int:
    """Orthanc's SR instances of one study (its REST API)."""
    req = urllib.request.Request(base + "/tools/find", method="POST", data=json.dumps(
        {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return len(json.loads(r.read()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained 2D X-ray classification run (default: train a tiny one)")
    ap.add_argument("--n", type=int, default=200, help="studies to send")
    ap.add_argument("--rate", type=float, default=2.0, help="studies per second")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the last delivery")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medlens-gateway-bench-"))
    run = a.run
    if run is None:
        from conftest import tiny_config

        from medlens.cli.common import quiet_libraries
        from medlens.workflow.train import train

        quiet_libraries()  # no Lightning tips or library warnings around the table, as the CLI does
        run = train(tiny_config(work / "runs", "bench"), progress_bar=False)
    orthanc, oproc = start_orthanc(work / "orthanc")
    port, mport = free_port(), free_port()
    cfg = work / "gateway.yaml"
    cfg.write_text(f"""listen: {{ae_title: MEDLENS_GW, host: 127.0.0.1, port: {port}}}
allowed_aets: [BENCH]
quiet_period_s: 1
poll_s: 0.1
spool: spool
audit: audit.jsonl
site_key_env: MEDLENS_BENCH_SITE_KEY
metrics: {{host: 127.0.0.1, port: {mport}}}
rules: [{{name: xr, match: {{modality: [DX]}}, runs: [{Path(run).resolve()}]}}]
destinations: [{{name: pacs, kind: dimse, url: "dimse://ORTHANC@127.0.0.1:{orthanc.dicom_port}"}}]
""")
    env = {**os.environ, "MEDLENS_BENCH_SITE_KEY": "benchmark-site-key-0123456789"}
    log = open(work / "gateway.log", "wb")
    gw = subprocess.Popen([str(Path(sys.executable).with_name("medlens")), "gateway", str(cfg)], stdout=log,
                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while "listening" not in (work / "gateway.log").read_text():
            if gw.poll() is not None:
                raise SystemExit((work / "gateway.log").read_text())
            time.sleep(0.2)
        rss0 = rss_mb(gw.pid)
        with np.load(Path(os.environ.get("MEDLENS_DATA", REPO.parent / "shared" / "data")) / "medmnist"
                     / "pneumoniamnist.npz") as z:
            images = z["test_images"]
        (work / "in").mkdir()
        studies = [xray_file(work / "in", images[i % len(images)]) for i in range(a.n)]
        peak, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
                    m = re.search(r"^medlens_gateway_queue_depth (\S+)", text, re.M)
                    if m:
                        peak[0] = max(peak[0], float(m.group(1)))
                except OSError:
                    pass
                stop.wait(0.25)

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.monotonic()
        for k, (f, _, _) in enumerate(studies):
            time.sleep(max(0.0, t0 + k / a.rate - time.monotonic()))
            subprocess.run(["storescu", "-aet", "BENCH", "-aec", "MEDLENS_GW", "127.0.0.1", str(port), str(f)],
                           check=True, capture_output=True, timeout=60)
        db = work / "spool" / "queue.sqlite"
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            con = sqlite3.connect(db)
            done = con.execute("SELECT count(*) FROM jobs WHERE state IN ('delivered','refused','failed')").fetchone()[0]
            con.close()
            if done >= a.n:
                break
            time.sleep(0.5)
        stop.set()
        con = sqlite3.connect(db)
        rows = con.execute("SELECT s.first_at, max(d.done_at) FROM series s JOIN jobs j ON j.series_uid=s.series_uid "
                           "JOIN deliveries d ON d.job_id=j.id WHERE j.state='delivered' GROUP BY s.series_uid").fetchall()
        states = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        answered = {s for (s,) in con.execute("SELECT series_uid FROM jobs WHERE state='refused' UNION "
                                               "SELECT series_uid FROM series WHERE state='unrouted'")}
        con.close()
        lat = np.array([b - a_ for a_, b in rows])
        elapsed = max(b for _, b in rows) - min(a_ for a_, _ in rows) if rows else float("nan")
        rss1 = rss_mb(gw.pid)
        per_study = [srs_of(orthanc.base, study) for _, study, _ in studies]
        # lost: no SR and not recorded as refused by the gate or unrouted (those get no SR by design)
        lost = sum(1 for c, (_, _, series) in zip(per_study, studies) if c == 0 and series not in answered)
        dup = sum(1 for c in per_study if c > 1)
        print("| studies | rate (/s) | throughput (/s) | latency p50 / p95 / p99 (s) | peak queue depth | "
              "RSS start / end (MB) | lost | duplicated | job states |")
        print("|---|---|---|---|---|---|---|---|---|")
        p50, p95, p99 = (np.percentile(lat, q) for q in (50, 95, 99)) if len(lat) else (np.nan,) * 3
        print(f"| {a.n} | {a.rate:g} | {len(rows) / elapsed:.2f} | {p50:.2f} / {p95:.2f} / {p99:.2f} | {peak[0]:.0f} | "
              f"{rss0:.0f} / {rss1:.0f} | {lost} | {dup} | {states} |")
    finally:
        if gw.poll() is None:
            os.kill(gw.pid, signal.SIGTERM)
            gw.wait(timeout=60)
        stop_orthanc(oproc)


if __name__ == "__main__":
    main()
