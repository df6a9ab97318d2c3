"""The outbound network exits (``pacs pull``, ``predict --from-pacs``, ``fhir --post``) against hostile peers
(issue 25): real server processes on 127.0.0.1 (``tests/security/hostile/``), started here and stopped by PID,
and the real CLI in subprocesses.

- A PACS whose UIDs traverse (``..``, an absolute path) writes nothing outside ``--out`` (nor anything at all),
  over DICOMweb and DIMSE C-GET alike, and ``predict --from-pacs`` leaves nothing in its temporary folder.
- A FHIR server that answers 307 does not get the Bundle re-sent elsewhere; plain http:// to another host is
  refused unless ``--allow-http``.
- A PACS that never answers fails within the timeout; a 1 GiB body (WADO-RS, or a FHIR error) is streamed
  against its cap and memory stays flat.
- A series of two patients gives no SR and nothing is pushed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOSTILE = Path(__file__).resolve().parent / "hostile"
STUDY = "1.2.826.0.1.3680043.8.498.25"
#: peak RSS of the CLI that counts as "memory stayed flat" for a 1 GiB body (the CLI itself takes ~70 MB)
RSS_BOUND_MB = 400

# runs the CLI and records its peak RSS (kB) in the file named by MEDLENS_TEST_RSS: VmHWM of this process image
# (getrusage's ru_maxrss would also count the test process it was forked from: it survives execve)
RSS_RUNNER = (
    "import os, re, sys\n"
    "from medlens.cli.main import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "finally:\n"
    "    hwm = re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "    open(os.environ['MEDLENS_TEST_RSS'], 'w').write(hwm)\n"
    "sys.exit(code)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medlens(*args, env: dict | None = None, timeout: float = 300, rss: Path | None = None):
    e = dict(os.environ)
    e.update(env or {})
    if rss is not None:
        e["MEDLENS_TEST_RSS"] = str(rss)
        cmd = [sys.executable, "-c", RSS_RUNNER, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "medlens.cli.main", *map(str, args)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    r.seconds = time.monotonic() - t0
    return r


def one_line_error(r, *needles) -> str:
    assert r.returncode != 0, r.stdout[-500:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def server(request):
    """``server(script, *args)`` starts ``hostile/<script>`` on a free port (its first argument) and returns
    the port once it accepts connections; every process is stopped by PID at the end of the test."""
    procs: list[subprocess.Popen] = []

    def start(script: str, *args) -> int:
        port = free_port()
        p = subprocess.Popen([sys.executable, str(HOSTILE / script), str(port), *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return port
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{script} did not start: {p.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


@pytest.fixture(scope="module")
def lidc(data_root) -> Path:
    return data_root / "lidc-idri-0001"


@pytest.fixture
def short_tmp():
    """A folder with a short absolute path: a DIMSE peer cannot send a UID over 64 characters, so the absolute
    path that a hostile SOPInstanceUID names has to fit in 64."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="mlv", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _victim(folder: Path) -> tuple[Path, bytes]:
    """Another patient's existing DICOM file beside the output folder (what the reproduction overwrote)."""
    v = folder / "victim.dcm"
    v.write_bytes(b"another patient's DICOM file")
    return v, v.read_bytes()


# ------------------------------------------------------------------------------------------ confined writes


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pull_with_traversing_uids_writes_nothing(kind, server, lidc, short_tmp):
    tmp_path = short_tmp
    script = "pacs_dicomweb.py" if kind == "dicomweb" else "pacs_dimse.py"

    def url(port):
        return f"http://127.0.0.1:{port}/dicom-web" if kind == "dicomweb" else f"dimse://HOSTILE@127.0.0.1:{port}"

    def extra(victim):
        return [tmp_path / "record.txt", victim] if kind == "dicomweb" else [victim]

    victim, before = _victim(tmp_path)
    # the control: the same server with valid UIDs is pulled in full, each instance under its UIDs
    port = server(script, "good", STUDY, lidc, *extra(victim))
    r = medlens("pacs", "pull", url(port), "--study", STUDY, "--out", tmp_path / "good")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "good" / f"{STUDY}.1").iterdir()) == \
        [f"{STUDY}.1.{i}.dcm" for i in (1, 2, 3)]
    for mode, shown in (("traverse", "SeriesInstanceUID '..'"), ("absolute", f"SOPInstanceUID '{str(tmp_path)[:20]}")):
        port = server(script, mode, STUDY, lidc, *extra(victim))
        out = tmp_path / f"out_{mode}"
        one_line_error(medlens("pacs", "pull", url(port), "--study", STUDY, "--out", out), shown,
                       "not a valid DICOM UID", "nothing was written")
        assert victim.read_bytes() == before, f"{mode}: the PACS overwrote a file outside --out"
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "victim.dcm"]  # no partial folder either


@pytest.mark.parametrize("mode, needles", [
    ("otherstudy", ["instance of another study", "nothing was written"]),
    ("duplicate", [f"SOPInstanceUID {STUDY}.1.1 twice"]),
    ("notdicom", ["part 2 of the PACS reply is not a DICOM file"]),
    ("leadingzero", [f"SOPInstanceUID '{STUDY}.1.02' is not a valid DICOM UID"]),
    ("redirect", ["redirect (HTTP 307)", "follows no redirect"]),
    ("declared", ["larger than 8,589,934,592 bytes", "MEDLENS_MAX_RETRIEVE_BYTES"])])
def test_pull_refuses_what_it_cannot_keep_as_sent(mode, needles, server, lidc, tmp_path):
    """Other ways a PACS can make a pull write the wrong thing: each stops it in one line, with nothing written."""
    port = server("pacs_dicomweb.py", mode, STUDY, lidc, tmp_path / "record.txt")
    r = medlens("pacs", "pull", f"http://127.0.0.1:{port}/dicom-web", "--study", STUDY, "--out", tmp_path / "o",
                timeout=60)
    one_line_error(r, *needles)
    assert list(tmp_path.iterdir()) == []


def test_user_uid_going_into_a_url_is_checked(tmp_path):
    for bad in ("../../x", "1.2.3/../../studies"):
        one_line_error(medlens("pacs", "pull", "http://127.0.0.1:9/dicom-web", "--study", bad, "--out",
                               tmp_path / "o"), "--study", "not a valid DICOM UID")
    assert not (tmp_path / "o").exists()


def test_predict_from_pacs_confined_one_patient_and_no_leftovers(server, lidc, trained_run, tmp_path,
                                                                  monkeypatch):
    import tempfile

    from clirun import medlens as medlens_here

    # predict runs in this process (torch is loaded once, not per command)

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where predict --from-pacs keeps the pulled study

    # the shared run learnt 28 px X-rays and the study is CT: the out-of-profile gate (its own tests are in
    # tests/integration/test_out_of_profile.py) is passed so that these checks reach the network exits
    def predict(port, out):
        return medlens_here("predict", trained_run, "--from-pacs", f"http://127.0.0.1:{port}/dicom-web", "--study",
                            STUDY, "--push", "--out", out, "--allow-out-of-profile")

    record = tmp_path / "stow.txt"
    victim, before = _victim(tmp_path)
    # absolute SOPInstanceUID: the old code wrote the victim outside its temporary folder and left it there
    port = server("pacs_dicomweb.py", "absolute", STUDY, lidc, record, victim)
    one_line_error(predict(port, tmp_path / "o1"), "SOPInstanceUID", "not a valid DICOM UID")
    assert victim.read_bytes() == before
    assert not (tmp_path / "o1").exists() and not record.exists()
    assert list(tmp.iterdir()) == [], "the pulled study was left in the temporary folder"

    # a series whose instances belong to two patients: no SR, nothing pushed, no identifier printed
    port = server("pacs_dicomweb.py", "mixed", STUDY, lidc, record)
    r = predict(port, tmp_path / "o2")
    line = one_line_error(r, "2 different PatientID values", f"series {STUDY}.1")
    assert "OTHER-PATIENT-42" not in r.stdout + r.stderr and "LIDC-IDRI-0001" not in r.stdout + line
    assert not (tmp_path / "o2").exists() and not record.exists(), "a two-patient series was pushed"
    assert list(tmp.iterdir()) == []

    # the control: one patient goes through, the SRs are stored (STOW-RS reached the server)
    port = server("pacs_dicomweb.py", "good", STUDY, lidc, record)
    r = predict(port, tmp_path / "o3")
    assert r.returncode == 0, r.stderr[-2000:]
    # the console wraps long lines (a long temporary path): compare the words
    assert "stored 3 instance(s)" in " ".join(r.stdout.split())
    assert len(list((tmp_path / "o3").glob("*_sr.dcm"))) == 3
    assert record.read_text().startswith("POST /dicom-web/studies ")
    assert list(tmp.iterdir()) == []


def test_predict_from_pacs_removes_its_pulled_study_when_killed(server, lidc, trained_run, tmp_path, monkeypatch):
    """SIGTERM during the pull removes the temporary folder; what a ``kill -9`` leaves is removed by the next run."""
    import signal
    import tempfile

    from clirun import medlens as medlens_here

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = server("pacs_dicomweb.py", "huge", STUDY, lidc, tmp_path / "record.txt")  # a pull that takes a while
    args = ["predict", trained_run, "--from-pacs", f"http://127.0.0.1:{port}/dicom-web", "--study", STUDY, "--out",
            tmp_path / "o"]

    def pulling() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", *map(str, args)], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
        deadline = time.monotonic() + 120
        while not any(tmp.rglob(".part-*")):  # the study is streaming into the temporary folder
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        return p

    p = pulling()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp.iterdir()) == [], "SIGTERM left the pulled study in the temporary folder"
    p = pulling()
    p.kill()
    p.wait(timeout=60)
    assert list(tmp.iterdir())  # a killed process cannot clean up ...
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("MEDLENS_MAX_RETRIEVE_BYTES", "1000")
    one_line_error(medlens_here(*args), "larger than 1,000 bytes")
    assert list(tmp.iterdir()) == [], "the next run did not remove what the killed one left"  # ... the next one does
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ where requests go


def _sr(lidc: Path, out: Path) -> Path:
    """A small TID 1500 SR (highdicom) on a real LIDC slice, to post."""
    import warnings

    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    src = pydicom.dcmread(next(lidc.rglob("*.dcm")))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="finding 1"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Diameter, value=7.5, unit=codes.UCUM.Millimeter)])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="test-device")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.ImagingProcedure,
                                     imaging_measurements=[group])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = hd.sr.Comprehensive3DSR(evidence=[src], content=report[0], series_instance_uid=hd.UID(),
                                     series_number=7, sop_instance_uid=hd.UID(), instance_number=1,
                                     manufacturer="test")
    path = out / "sr.dcm"
    sr.save_as(path)
    return path


def test_fhir_post_does_not_follow_a_redirect(server, lidc, tmp_path):
    sr = _sr(lidc, tmp_path)
    record = tmp_path / "second_listener.txt"
    other = server("fhir_server.py", "record", record)
    redirecting = server("fhir_server.py", "redirect", f"http://127.0.0.1:{other}/fhir")
    one_line_error(medlens("fhir", sr, "--post", f"http://127.0.0.1:{redirecting}/fhir"), "redirect",
                   "HTTP 307", "not re-sent")
    assert not record.exists(), "the Bundle (patient identifier included) was re-posted to the redirect target"
    # the control: the second listener does record a POST sent to it directly
    r = medlens("fhir", sr, "--post", f"http://127.0.0.1:{other}/fhir")
    assert r.returncode == 0, r.stderr
    assert record.read_text().startswith("POST /fhir ")


def test_plain_http_to_another_host_needs_allow_http(lidc, trained_run, tmp_path):
    sr = _sr(lidc, tmp_path)
    remote = "192.0.2.1"  # TEST-NET-1: not this machine (and not routed: nothing is ever sent there)
    cases = [("fhir", sr, "--post", f"http://{remote}/fhir"),
             ("pacs", "pull", f"http://{remote}/dicom-web", "--study", STUDY, "--out", tmp_path / "o"),
             ("pacs", "query", f"dimse://PACS@{remote}:104"),
             ("pacs", "push", f"http://{remote}/dicom-web", sr),
             ("predict", trained_run, "--from-pacs", f"http://{remote}/dicom-web", "--study", STUDY, "--out",
              tmp_path / "o")]
    # the CLI's entry point in this process (tests/clirun.py): the time measured is the command's, not the
    # library's imports, so "refused before any connection" is a tight bound
    from clirun import medlens as inproc

    def timed(*args, env=None):
        t0 = time.monotonic()
        r = inproc(*args, env=env)
        r.seconds = time.monotonic() - t0
        return r

    for args in cases:
        r = timed(*args)
        one_line_error(r, "unencrypted", "--allow-http")
        assert r.seconds < 5, (args[:2], r.seconds)
    assert not (tmp_path / "o").exists()
    # with the flag the request is attempted (and fails: unreachable, or the timeout where packets are dropped)
    r = timed("fhir", sr, "--post", f"http://{remote}/fhir", "--allow-http",
              env={**os.environ, "MEDLENS_NET_TIMEOUT": "1"})
    one_line_error(r, "FHIR server")
    assert "unencrypted" not in r.stderr and r.seconds < 10, r.seconds
    # this machine is fine over http: 127.0.0.1, ::1 and localhost (refused connection, not refused URL)
    for host in ("127.0.0.1", "[::1]", "localhost"):
        one_line_error(inproc("fhir", sr, "--post", f"http://{host}:9/fhir"), "unreachable")


# ------------------------------------------------------------------------------------------ timeouts and caps


def test_a_pacs_that_never_answers_fails_within_the_timeout(server, lidc, tmp_path):
    sr = _sr(lidc, tmp_path)
    port = server("pacs_silent.py")
    env = {"MEDLENS_NET_TIMEOUT": "2"}
    for args, needle in (
            (("pacs", "pull", f"http://127.0.0.1:{port}/dicom-web", "--study", STUDY, "--out", tmp_path / "o"),
             "did not answer in time"),
            (("pacs", "pull", f"dimse://PACS@127.0.0.1:{port}", "--study", STUDY, "--out", tmp_path / "o"),
             "no answer"),
            (("fhir", sr, "--post", f"http://127.0.0.1:{port}/fhir"), "did not answer in time")):
        r = medlens(*args, env=env, timeout=60)
        one_line_error(r, needle)
        assert r.seconds < 20, f"{args[:2]} took {r.seconds:.0f} s with a 2 s timeout"
    assert not (tmp_path / "o").exists()


def test_huge_bodies_are_streamed_within_their_caps(server, lidc, tmp_path):
    port = server("pacs_dicomweb.py", "huge", STUDY, lidc, tmp_path / "record.txt")
    url = f"http://127.0.0.1:{port}/dicom-web"
    rss = tmp_path / "rss"
    # with a cap: refused as soon as the body passes it, in one line naming the setting
    r = medlens("pacs", "pull", url, "--study", STUDY, "--out", tmp_path / "o",
                env={"MEDLENS_MAX_RETRIEVE_BYTES": str(64 << 20)}, rss=rss, timeout=120)
    one_line_error(r, "larger than 67,108,864 bytes", "MEDLENS_MAX_RETRIEVE_BYTES", "nothing was written")
    assert int(rss.read_text()) < RSS_BOUND_MB * 1024
    # with the default cap (8 GiB, on disk) the 1 GiB part goes to disk, never to memory, and is refused whole
    r = medlens("pacs", "pull", url, "--study", STUDY, "--out", tmp_path / "o", rss=rss, timeout=120)
    one_line_error(r, "ended inside part 1", "nothing was written")
    assert int(rss.read_text()) < RSS_BOUND_MB * 1024, f"peak RSS {int(rss.read_text()) >> 10} MB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rss"]  # no partial folder left beside --out

    # a FHIR server answering 500 with a 1 GiB error body: the first 64 KiB are read, the rest is not
    sr = _sr(lidc, tmp_path)
    port = server("fhir_server.py", "huge-error")
    r = medlens("fhir", sr, "--post", f"http://127.0.0.1:{port}/fhir", rss=rss, timeout=120)
    one_line_error(r, "refused the transaction", "HTTP 500")
    assert int(rss.read_text()) < RSS_BOUND_MB * 1024 and r.seconds < 30
