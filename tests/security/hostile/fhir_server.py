"""Hostile FHIR servers for the security tests; a real process on 127.0.0.1, stopped by PID by the test.

    python fhir_server.py PORT MODE ARG

MODE:
- ``redirect``: every POST (body read) is answered ``307 Temporary Redirect`` to the URL ARG;
- ``record``: any request is appended to the file ARG (method, path, body length) and answered 200 with an
  empty transaction-response Bundle (the second listener: a client that follows the redirect lands here);
- ``huge-error``: every POST is answered ``500`` with 1 GiB of ``x`` (generated, never held), without
  Content-Length (the body ends when the connection closes).

The process exits on its own after 300 s.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, MODE, ARG = int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""


class Handler(BaseHTTPRequestHandler):
    def _body(self) -> int:
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        return n

    def _any(self):
        n = self._body()
        if MODE == "record":
            with open(ARG, "a") as f:
                f.write(f"{self.command} {self.path} {n}\n")
            data = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif MODE == "redirect":
            self.send_response(307)
            self.send_header("Location", ARG)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif MODE == "huge-error":
            self.send_response(500)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(1024):
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True

    do_POST = do_GET = do_PUT = _any

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
threading.Timer(300, server.shutdown).start()
server.serve_forever()
