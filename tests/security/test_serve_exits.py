"""The exits of ``medlens serve`` attacked from real sockets on 127.0.0.1 (issue 25): bodies counted while they
stream (a chunked 50 MB upload to an 8 MB limit is refused early, RSS bounded), slow-header and slow-body
clients dropped, stale upload folders of a killed server removed at start-up, one patient per uploaded series,
and the small leaks closed (readyz, 422 paths, session cookie, Host allow-list, no CDN, TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from clirun import medlens as inproc
from servehelp import REPO, Server, free_port

KEY = "serve-exits-" + "k" * 24
LIMIT_MB = 8
READ_TIMEOUT = 2


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """Leftovers of a killed server in the system's temporary folder: a series folder of a dead PID (a real
    process, started and ended here), and decoys that must survive: a live PID's folder, another name."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    # the server's own temporary folder (its TMPDIR): another medlens process on this machine cleaning the
    # system's temporary folder at the same time cannot take the leftovers before this server sees them
    tmp = tmp_path_factory.mktemp("spool")
    dead_dir = tmp / f"medlens-upload-{dead}-stalexyz"
    (dead_dir / "series").mkdir(parents=True)
    (dead_dir / "series" / "00000.dcm").write_bytes(b"patient data")
    dead_file = tmp / f"medlens-upload-{dead}-stalefile.dcm"
    dead_file.write_bytes(b"patient data")
    live_dir = tmp / f"medlens-upload-{os.getpid()}-liveabc"     # this pytest process: alive
    live_dir.mkdir()
    other = tmp / f"not-medlens-{dead}-keep"
    other.mkdir()
    paths = {"dead_dir": dead_dir, "dead_file": dead_file, "live_dir": live_dir, "other": other}
    yield {**paths, "root": tmp}
    for q in paths.values():
        if q.is_dir():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory, stale):
    base = tmp_path_factory.mktemp("serve-exits")
    s = Server([trained_run], base / "server.log", "--max-upload-mb", str(LIMIT_MB), "--read-timeout",
               str(READ_TIMEOUT), env={"MEDLENS_API_KEYS": KEY, "TMPDIR": str(stale["root"])})
    s.spool = stale["root"]
    s.run_dir = Path(trained_run)
    s.name = Path(trained_run).name
    yield s
    s.stop()
    assert not s.alive()


def _client(server, key=KEY, **kw):
    import httpx

    return httpx.Client(base_url=server.url, headers={"X-API-Key": key} if key else {}, timeout=60, **kw)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(28 * 28) % 255).reshape(28, 28).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- bounded uploads
def test_chunked_upload_over_the_limit_gets_413_while_streaming(server):
    """A chunked body (no Content-Length) of up to 50 MB to an 8 MB limit: the 413 arrives before the client
    has sent 24 MB, the connection is closed, and the server's peak RSS grows by far less than the body."""
    hwm0 = _rss_kb(server.pid)
    boundary = "b0undary"
    head = (f"POST /v1/models/{server.name}/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"X-API-Key: {KEY}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n"
    chunk = bytes(256 * 1024)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 50 * 1024 * 1024:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([s], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        t0 = time.time()
        while time.time() - t0 < 10:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer and answer.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
                break
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 24 * 1024 * 1024, sent      # refused while streaming (8 MB + socket buffers), not after 50 MB
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[-1].split(b"\r\n0\r\n")[0]
                      if b"transfer-encoding: chunked" in answer.lower() else answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "PayloadTooLarge" and "--max-upload-mb" in body["error"]["message"]
    assert b"connection: close" in answer.lower()
    growth_mb = (_rss_kb(server.pid) - hwm0) / 1024
    assert growth_mb < 40, growth_mb
    assert server.alive()
    with _client(server) as c:    # and it serves the next upload
        assert c.post(f"/v1/models/{server.name}/predict", files={"file": ("a.png", _png())}).status_code == 200


def test_declared_length_over_the_limit_is_refused_before_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall((f"POST /v1/models/{server.name}/predict HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\n"
                   f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n"
                   ).encode())
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _slow(sockets: dict, seconds: float) -> dict:
    """Trickle one byte every 0.25 s into every socket; the time each one was closed by the server, or None."""
    closed: dict = {k: None for k in sockets}
    answers: dict = {k: b"" for k in sockets}
    t0 = time.time()
    while time.time() - t0 < seconds and any(v is None for v in closed.values()):
        for k, s in sockets.items():
            if closed[k] is not None:
                continue
            try:
                if select.select([s], [], [], 0)[0]:
                    data = s.recv(4096)
                    answers[k] += data
                    if not data:
                        closed[k] = time.time() - t0
                        continue
                s.send(b"a")
            except OSError:
                closed[k] = time.time() - t0
        time.sleep(0.25)
    return {k: (closed[k], answers[k]) for k in sockets}


def test_slow_header_and_slow_body_clients_are_dropped(server):
    """16 slow-header and 16 slow-body connections, each sending a byte every 0.25 s for ever: all closed within
    the read timeout (2 s) plus a margin; the slow bodies get 408; the server answers others meanwhile."""
    socks = {}
    try:
        for i in range(16):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 4 == 0:    # a keep-alive connection: one full request first, then a slow head
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-{i}: ".encode())
            socks[f"head{i}"] = s
        for i in range(16):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall((f"POST /v1/models/{server.name}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
                       "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n"
                       ).encode())
            socks[f"body{i}"] = s
        with _client(server) as c:
            assert c.get("/healthz").status_code == 200
        result = _slow(socks, READ_TIMEOUT + 6)
    finally:
        for s in socks.values():
            s.close()
    still_open = [k for k, (t, _) in result.items() if t is None]
    assert not still_open, still_open
    assert max(t for t, _ in result.values()) < READ_TIMEOUT + 4
    for k, (_, answer) in result.items():
        if k.startswith("body"):
            assert answer.startswith(b"HTTP/1.1 408"), (k, answer[:200])
    with _client(server) as c:
        assert c.get("/healthz").status_code == 200


def test_huge_request_head_is_cut(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = 0
        try:
            for _ in range(200):     # 200 x 8 KB header lines: 1.6 MB of head
                s.sendall(b"X-Pad: " + b"p" * 8192 + b"\r\n")
                sent += 8201
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            pass
    assert sent < 1024 * 1024 or answer.startswith(b"HTTP/1.1 431") or answer == b"", (sent, answer[:100])
    assert not answer.startswith(b"HTTP/1.1 200")


def test_stale_upload_folders_removed_at_start_up_and_decoys_kept(server, stale):
    assert not stale["dead_dir"].exists() and not stale["dead_file"].exists()
    assert stale["live_dir"].is_dir() and stale["other"].is_dir()
    log = [json.loads(ln) for ln in server.log_path.read_text().splitlines() if ln.startswith("{")]
    assert any(r.get("event") == "stale-uploads-removed" and r.get("files") >= 2 for r in log)


def test_no_upload_file_outlives_its_request(server):
    """Accepted and refused uploads alike leave nothing named after the server's PID in the temporary folder."""
    with _client(server) as c:
        assert c.post(f"/v1/models/{server.name}/predict", files={"file": ("a.png", _png())}).status_code == 200
        assert c.post(f"/v1/models/{server.name}/predict",
                      files={"file": ("a.png", _png()[:60])}).status_code == 422
        r = c.post(f"/v1/models/{server.name}/predict",
                   files=[("file", ("a.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)),
                          ("file", ("b.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64))])
        assert r.status_code == 422
    left = [p.name for p in server.spool.glob(f"medlens-*-{server.pid}-*")]
    assert not left, left


# ---------------------------------------------------------------- one patient per series
def _series_files(data_root: Path, n: int = 4) -> list[Path]:
    import glob

    import pydicom

    dcm = sorted(glob.glob(str(data_root / "lidc-idri-0001" / "**" / "*.dcm"), recursive=True))
    by_z = sorted((float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), p) for p in dcm)
    return [Path(p) for _, p in by_z[70:70 + n]]


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_a_series_of_two_patients_is_refused(server, data_root, keyword):
    import io

    import pydicom

    parts = []
    for i, p in enumerate(_series_files(data_root)):
        ds = pydicom.dcmread(p)
        if i == 2:
            setattr(ds, keyword, "OTHER-PATIENT-4711" if keyword == "PatientID" else "1.2.826.0.1.3680043.9.4711")
        buf = io.BytesIO()
        ds.save_as(buf)
        parts.append(("file", (f"{i}.dcm", buf.getvalue())))
    original = str(pydicom.dcmread(_series_files(data_root)[0], stop_before_pixels=True).get(keyword))
    with _client(server) as c:
        r = c.post(f"/v1/models/{server.name}/predict", files=parts)
        ok = c.post(f"/v1/models/{server.name}/predict", files=parts[:2] + parts[3:])
    assert r.status_code == 422, r.text[:300]
    msg = r.json()["error"]["message"]
    assert keyword in msg and "2 different" in msg and len(msg.splitlines()) == 1
    assert "4711" not in r.text and original not in r.text
    assert ok.status_code != 422 or keyword not in ok.json()["error"]["message"]


# ---------------------------------------------------------------- small leaks
def test_readyz_says_only_ready_without_a_key(server):
    with _client(server, key=None) as anon:
        assert anon.get("/readyz").json() == {"status": "ready"}
        assert anon.get("/readyz", headers={"X-API-Key": "wrong-" + "w" * 20}).json() == {"status": "ready"}
    with _client(server) as c:
        assert c.get("/readyz").json()["models"] == {server.name: "pytorch"}


def test_error_answers_carry_no_server_path(server, tmp_path):
    """A 422 validation answer and a refused upload name no folder of the server's machine."""
    import nibabel as nib

    huge = tmp_path / "huge.nii"
    a = np.full((28, 28), 3e38, np.float32)
    a[0, 0] = -3e38
    nib.save(nib.Nifti1Image(a, np.eye(4)), huge)
    with _client(server) as c:
        answers = [c.post(f"/v1/models/{server.name}/predict", params={"heatmap": "maybe"},
                          files={"file": ("a.png", _png())}),
                   c.post(f"/v1/models/{server.name}/predict", files={"file": ("huge.nii", huge.read_bytes())}),
                   c.post(f"/v1/models/{server.name}/predict", files={"file": ("a.png", _png()[:60])}),
                   c.post(f"/v1/models/{server.name}/predict", params={"format": "x"},
                          files={"file": ("a.png", _png())})]
    for r in answers:
        assert r.status_code == 422, r.text[:300]
        text = r.text
        for root in (str(server.run_dir), str(server.run_dir.resolve()), tempfile.gettempdir(), str(server.spool), str(REPO),
                     "/work", "/home", "/root"):
            assert root not in text, (root, text[:300])


def test_login_cookie_is_a_random_session_token(server):
    with _client(server, key=None, follow_redirects=False) as c:
        r = c.post("/login", data={"key": KEY})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        name, _, rest = cookie.partition("=")
        token = rest.split(";")[0]
        assert name == "medlens_session" and len(token) >= 32 and KEY not in cookie and token != KEY
        flags = {f.strip().lower() for f in cookie.split(";")[1:]}
        assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
        again = c.post("/login", data={"key": KEY}).headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert again != token     # a fresh token per login
        c.cookies.clear()
        assert c.get("/v1/models", cookies={"medlens_session": token}).status_code == 200
        assert c.get("/readyz", cookies={"medlens_session": token}).json()["models"]
        assert c.get("/v1/models", cookies={"medlens_session": KEY}).status_code == 401    # the key is no cookie
        assert c.get("/v1/models", cookies={"medlens_key": KEY}).status_code == 401
        assert c.get("/v1/models", cookies={"medlens_session": "x" * 43}).status_code == 401
        assert c.post("/logout", cookies={"medlens_session": token}).status_code == 303
        assert c.get("/v1/models", cookies={"medlens_session": token}).status_code == 401


def test_unknown_host_header_gets_400(server):
    import httpx

    for host, ok in (("evil.example", False), (f"evil.example:{server.port}", False), ("127.0.0.2", False),
                     (f"localhost:{server.port}", True), (f"127.0.0.1:{server.port}", True), ("[::1]", True)):
        r = httpx.get(server.url + "/healthz", headers={"Host": host}, timeout=10)
        assert (r.status_code == 200) == ok, (host, r.status_code)
        if not ok:
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadHost"
    r = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example", "X-API-Key": KEY}, timeout=10)
    assert r.status_code == 400
    for head in (b"Host: 127.0.0.1:80@evil.example\r\n", b"Host: localhost\r\nHost: evil.example\r\n", b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n" + head + b"\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 400"), head


def test_no_page_loads_anything_from_another_origin(server):
    with _client(server) as c:
        assert c.get("/docs").status_code in (401, 404) and c.get("/redoc").status_code in (401, 404)
        assert "/v1/models/{name}/predict" in c.get("/openapi.json").json()["paths"]
        pages = [c.get("/").text, c.get("/static/401.html").text]
    for page in pages:
        assert "cdn" not in page.lower() and "https://" not in page and "http://" not in page


# ---------------------------------------------------------------- TLS
def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medlens.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("medlens.test"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    c, k = folder / "cert.pem", folder / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def test_tls_handshake_and_secure_cookie(trained_run, tmp_path):
    import httpx

    cert, key = _self_signed(tmp_path)
    port = free_port()
    log = open(tmp_path / "tls.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "medlens.cli.main", "serve", str(trained_run), "--port", str(port),
                             "--tls-cert", str(cert), "--tls-key", str(key), "--allowed-host", "medlens.test"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "MEDLENS_API_KEYS": KEY})
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        url = f"https://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "tls.log").read_text()[-2000:]
            assert time.time() - t0 < 120, (tmp_path / "tls.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/readyz", verify=ctx, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(httpx.HTTPError):           # plain HTTP on the TLS port gets no answer
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            raise httpx.HTTPError(f"answered {r.status_code}") if r.status_code >= 400 else AssertionError(r.text)
        with httpx.Client(base_url=url, verify=ctx, timeout=30, follow_redirects=False) as c:
            r = c.post("/login", data={"key": KEY})
            flags = {f.strip().lower() for f in r.headers["set-cookie"].split(";")[1:]}
            assert r.status_code == 303 and "secure" in flags and KEY not in r.headers["set-cookie"]
            assert c.get("/healthz", headers={"Host": "medlens.test"}).status_code == 200   # --allowed-host
            assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def test_tls_files_that_do_not_load_are_one_line(trained_run, tmp_path):
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    # the CLI's entry point in this process: the files are checked before the server starts (a subprocess
    # would add only the library's imports)
    r = inproc("serve", trained_run, "--port", free_port(), "--tls-cert", bad, "--tls-key", bad, cwd=REPO)
    err = r.stderr.strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err[-500:]
    assert "TLS certificate and key do not load" in err, err
    from medlens.errors import ConfigError
    from medlens.serve.app import ServeSettings, check_binding

    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        check_binding(ServeSettings(tls_cert=str(bad)))
