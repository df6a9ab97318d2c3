"""The gateway's DICOM receiver: a pynetdicom C-STORE SCP (and C-ECHO) that accepts associations only from the
AE titles of ``allowed_aets`` (others are rejected at association, before any data moves).

Each instance is written into the spool atomically (a temporary file beside it, fsynced, ``os.replace``, the
folder fsynced) and recorded in the queue before the C-STORE is answered with success: an instance the sender
saw stored is on disk and in the queue. A full disk or any other write error answers 0xA700 (out of resources)
and leaves nothing behind: no file, no queue row. An instance already recorded (the same SOP Instance UID sent
again) is answered with success and not written twice. Spool file names are HMACs of the UIDs, so no UID
appears in a path (or in an error naming one).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # pyright: ignore[reportAttributeAccessIssue]

from medlens.errors import DataError
from medlens.gateway.audit import AuditLog
from medlens.gateway.config import GatewayConfig
from medlens.gateway.metrics import GatewayMetrics
from medlens.gateway.queue import Queue
from medlens.io import net

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically and durably (temp file fsynced, renamed, folder fsynced); on any error
    nothing is left (the temporary file is removed) and the OSError propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class Spool:
    """Where received instances go, whatever carried them (C-STORE here, STOW-RS in ``gateway.stow``): each
    one written durably under HMAC names, then recorded in the queue, then audited; a DICOM status back."""

    def __init__(self, cfg: GatewayConfig, queue: Queue, audit: AuditLog, metrics: GatewayMetrics) -> None:
        self.cfg, self.queue, self.audit, self.metrics = cfg, queue, audit, metrics
        self.root = cfg.spool / "instances"

    def path(self, series_uid: str, sop_uid: str) -> Path:
        return self.root / self.audit.hash(series_uid)[:24] / f"{self.audit.hash(sop_uid)}.dcm"

    def store(self, ds, encoded: bytes, sender: str) -> int:
        """Keep one instance (``ds`` its decoded header, ``encoded`` its Part-10 bytes): 0x0000 once it is on
        disk and in the queue (or was already), 0xA700 when it could not be kept (nothing left), 0xC000 for a
        data set without valid UIDs."""
        try:
            sop = net.uid_name(str(ds.get("SOPInstanceUID", "")), "SOPInstanceUID")
            series = net.uid_name(str(ds.get("SeriesInstanceUID", "")), "SeriesInstanceUID")
            study = net.uid_name(str(ds.get("StudyInstanceUID", "")), "StudyInstanceUID")
        except DataError:
            return CANNOT_UNDERSTAND
        if self.queue.has_instance(sop):
            return SUCCESS  # the same instance again: already spooled and recorded
        path = self.path(series, sop)
        try:
            write_durably(path, encoded)
        except OSError:
            return OUT_OF_RESOURCES
        try:
            new = self.queue.add_instance(sop, series, study, str(path), sender)
        except Exception:  # the queue could not record it (a full disk): the file goes too, the sender retries
            with contextlib.suppress(OSError):
                path.unlink()
            return OUT_OF_RESOURCES
        if new:
            self.metrics.received.labels(sender).inc()
            self.audit.event("received", calling_aet=sender, study=study, series=series, instance=sop,
                             modality=str(ds.get("Modality", "")))
        return SUCCESS


class StoreSCP:
    def __init__(self, cfg: GatewayConfig, spool: Spool) -> None:
        self.cfg, self.spool = cfg, spool
        self.server = None

    def on_store(self, event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            encoded = event.encoded_dataset(include_meta=True)
        except Exception:  # an undecodable data set: refused, nothing kept
            return CANNOT_UNDERSTAND
        return self.spool.store(ds, encoded, calling)

    def start(self) -> None:
        ae = AE(ae_title=self.cfg.listen.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.cfg.allowed_aets)
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0
        self.server = ae.start_server((self.cfg.listen.host, self.cfg.listen.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
