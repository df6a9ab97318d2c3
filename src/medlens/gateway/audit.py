"""The gateway's audit trail: JSON lines, one per event, each written whole and fsynced before the event counts.

Events: ``received`` (calling AE, hashed study/series/instance UIDs), ``routed`` / ``unrouted`` (rule or
reason), ``predicted`` (run, weights hash, outcome), ``refused`` (the out-of-profile reasons), ``failed``,
``delivered`` (destination, attempt), ``delivery_failed`` (destination, attempt, error), ``drift`` /
``drift_cleared``; change control: ``shadow_predicted`` / ``shadow_refused`` / ``shadow_failed`` and ``promoted``
(``gateway.shadow``); the worklist's ``ups_created`` / ``ups_updated`` / ``ups_state`` / ``ups_cancel_requested`` /
``ups_subscription`` (``gateway.ups``). No PHI in the clear: every UID is
replaced by its HMAC-SHA256 under the site key (``uid_hash``), and no patient name or ID is ever passed here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path

#: event fields that hold a DICOM UID: hashed before they are written
UID_FIELDS = ("study", "series", "instance")


def uid_hash(key: bytes, uid: str) -> str:
    """The audit trail's name of a UID: HMAC-SHA256 under the site key, hex, first 32 characters."""
    return hmac.new(key, uid.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


class AuditLog:
    def __init__(self, path: str | Path, key: bytes) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def hash(self, uid: str) -> str:
        return uid_hash(self.key, uid)

    def event(self, kind: str, **fields) -> None:
        """Append one event (UID fields hashed), flushed and fsynced."""
        rec: dict[str, object] = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": kind}
        for k, v in fields.items():
            rec[k] = self.hash(str(v)) if k in UID_FIELDS and v is not None else v
        line = json.dumps(rec, ensure_ascii=True, sort_keys=False) + "\n"
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
