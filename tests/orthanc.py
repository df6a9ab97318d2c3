"""A real Orthanc PACS for tests: Debian's ``orthanc`` with its DICOMweb plugin (``orthanc-dicomweb``), started
from a generated config on free ports with a temporary storage folder, and stopped by its PID.

Use the session fixture in a test module::

    from orthanc import orthanc  # noqa: F401  (the fixture)

    def test_x(orthanc):
        orthanc.dicomweb   # http://127.0.0.1:<port>/dicom-web
        orthanc.dimse      # dimse://ORTHANC@127.0.0.1:<port>

``make system-deps`` installs the packages (``make test`` runs it first).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    pid: int
    folder: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{AET}@127.0.0.1:{self.dicom_port}"

    def rest(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())


def start_orthanc(folder: Path, timeout: float = 60.0) -> tuple[Orthanc, subprocess.Popen]:
    exe = shutil.which("Orthanc")
    if exe is None or not PLUGIN.exists():
        raise RuntimeError("Orthanc or its DICOMweb plugin is missing: run `make system-deps` (Debian packages "
                           "orthanc, orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    cfg = {"Name": "medlens-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
           "HttpPort": http, "DicomPort": dicom, "DicomAet": AET, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
           "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
           "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
           "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "UnknownSopClassAccepted": True,
           "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 8, "StableAge": 1,
           "SaveJobs": False, "DicomScpTimeout": 30}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Orthanc(http, dicom, proc.pid, folder)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            plugins = server.rest("/plugins")
            if "dicom-web" in plugins:
                urllib.request.urlopen(server.dicomweb + "/studies", timeout=5).read()
                return server, proc
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.3)
    stop_orthanc(proc)
    raise RuntimeError(f"Orthanc did not get ready in {timeout:.0f} s")


def stop_orthanc(proc: subprocess.Popen) -> None:
    """Stop the Orthanc we started, by its PID (SIGTERM, then SIGKILL after 15 s)."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    server, proc = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(proc)
