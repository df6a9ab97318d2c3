"""A hostile DICOMweb PACS for the security tests (a real process on 127.0.0.1, stopped by PID by the test).

    python pacs_dicomweb.py PORT MODE STUDY_UID SRC_FOLDER RECORD [VICTIM]

It answers QIDO-RS (the study has one CT series), WADO-RS (multipart/related; type="application/dicom", as
dicomweb-client and Orthanc do) with the first three DICOM files of SRC_FOLDER moved into STUDY_UID, and
STOW-RS (it appends one line per store to RECORD). MODE:

- ``good``: valid UIDs, one patient (the control);
- ``traverse``: the first instance's SeriesInstanceUID is ``..`` and its SOPInstanceUID the stem of VICTIM, so a
  client that joins them under its output folder writes VICTIM (beside the folder);
- ``absolute``: the first instance's SOPInstanceUID is VICTIM without ``.dcm`` (an absolute path);
- ``mixed``: valid UIDs, but the second instance belongs to another patient;
- ``huge``: the WADO-RS body is one part of 1 GiB of zeros, sent without Content-Length (generated, never held);
- ``declared``: the WADO-RS answer declares a Content-Length of 1 TiB (and sends a few bytes);
- ``otherstudy``: the second instance belongs to another study;
- ``duplicate``: the second instance repeats the first one's SOPInstanceUID;
- ``notdicom``: the second part is not a DICOM file;
- ``redirect``: the WADO-RS request is answered 307 to another address;
- ``leadingzero``: the first instance's SOPInstanceUID has a component with a leading zero (``1.02``).

The process exits on its own after 300 s.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom

PORT, MODE, STUDY, SRC, RECORD = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])
VICTIM = Path(sys.argv[6]) if len(sys.argv) > 6 else None
SERIES = STUDY + ".1"
BOUNDARY = "hostile-boundary-7d1f"


def instances() -> list[bytes]:
    out = []
    warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs this server means to send
    for i, f in enumerate(sorted(SRC.rglob("*.dcm"))[:3]):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
        ds.SOPInstanceUID = f"{SERIES}.{i + 1}"
        if i == 0 and MODE == "traverse":
            ds.SeriesInstanceUID, ds.SOPInstanceUID = "..", VICTIM.stem
        if i == 0 and MODE == "absolute":
            ds.SOPInstanceUID = str(VICTIM.with_suffix(""))
        if i == 1 and MODE == "mixed":
            ds.PatientID = "OTHER-PATIENT-42"
        if i == 1 and MODE == "otherstudy":
            ds.StudyInstanceUID = STUDY + ".99"
        if i == 1 and MODE == "duplicate":
            ds.SOPInstanceUID = f"{SERIES}.1"
        if i == 0 and MODE == "leadingzero":
            ds.SOPInstanceUID = f"{SERIES}.02"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    if MODE == "notdicom":
        out[1] = b"this is not a DICOM file" * 10
    return out


PARTS = instances()


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/studies") or path.endswith(f"/studies/{STUDY}/series"):
            row = {"0020000D": {"vr": "UI", "Value": [STUDY]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
                   "00080060": {"vr": "CS", "Value": ["CT"]}}
            body = json.dumps([row] if (STUDY in path or path.endswith("/studies")) else []).encode()
            return self._send(200, body, "application/dicom+json")
        if path.endswith("/series"):
            return self._send(200, b"[]", "application/dicom+json")
        if path.endswith(f"/studies/{STUDY}") or path.endswith(f"/series/{SERIES}"):
            if MODE == "redirect":
                self.send_response(307)
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            if MODE == "huge":  # no Content-Length: the body ends when the connection closes
                self.end_headers()
                self.wfile.write(head)
                zeros = bytes(1 << 20)
                try:
                    for _ in range(1024):
                        self.wfile.write(zeros)
                except OSError:
                    pass
                self.close_connection = True
                return
            body = b"".join(head + p + b"\r\n" for p in PARTS) + f"--{BOUNDARY}--\r\n".encode()
            self.send_header("Content-Length", str(1 << 40 if MODE == "declared" else len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client stopped reading (as it should, for ``declared``)
                pass
            return
        self._send(404, b"[]", "application/dicom+json")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)
                n += size
                if size == 0:
                    break
        else:
            self.rfile.read(n)
        with open(RECORD, "a") as f:
            f.write(f"POST {self.path} {n}\n")
        self._send(200, b"{}", "application/dicom+json")

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
threading.Timer(300, server.shutdown).start()
server.serve_forever()
