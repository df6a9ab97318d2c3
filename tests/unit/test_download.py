"""download(): HTTP range resume and MD5 verification, against a real HTTP server on loopback."""

import hashlib
import http.server
import threading

import pytest

from medlens.data.download import download
from medlens.errors import DataError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):
        RangeHandler.requests.append(self.headers.get("Range"))
        data, status = PAYLOAD, 200
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            data, status = PAYLOAD[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/file.npz"
    srv.shutdown()


def test_download_resumes_a_partial_file_and_checks_md5(server, tmp_path):
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    dest = tmp_path / "file.npz"
    (tmp_path / "file.npz.part").write_bytes(PAYLOAD[:300_000])  # an interrupted earlier download
    download(server, dest, md5)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "file.npz.part").exists()
    assert RangeHandler.requests == ["bytes=300000-"]  # only the rest was fetched
    download(server, dest, md5)  # already complete and verified: no new request
    assert len(RangeHandler.requests) == 1


def test_download_with_wrong_md5_keeps_nothing(server, tmp_path):
    dest = tmp_path / "file.npz"
    with pytest.raises(DataError, match="expected 0+"):
        download(server, dest, "0" * 32)
    assert not dest.exists() and not (tmp_path / "file.npz.part").exists()


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="re-run the same command to resume"):
        download("http://127.0.0.1:9/none.npz", tmp_path / "x.npz", timeout=2)
