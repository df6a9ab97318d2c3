"""A PACS that accepts every TCP connection and never answers (not a byte), for the timeout tests; a real
process on 127.0.0.1, stopped by PID by the test.

    python pacs_silent.py PORT

It holds each connection open without reading or writing, and exits on its own after 300 s.
"""

from __future__ import annotations

import socket
import sys
import time

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
srv.settimeout(1.0)
held, t0 = [], time.monotonic()
while time.monotonic() - t0 < 300:
    try:
        conn, _ = srv.accept()
        held.append(conn)  # kept open, never read from or written to
    except TimeoutError:
        pass
