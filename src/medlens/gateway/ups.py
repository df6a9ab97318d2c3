"""The gateway's AIW-I worklist (issue 28): a DIMSE Unified Procedure Step SCP on the gateway's own AE (same port,
same AE-title allow-list), its work items kept in the gateway's SQLite queue file, surviving restarts.

What the gateway does with it (``UpsService.sync``, once per worker step, and ``UpsWorker.assemble``):

- every series that completes assembly becomes a work item (SCHEDULED), unless a client already created one for
  it; the gateway then claims it (IN PROGRESS, with a Transaction UID only it knows);
- when the series is finished the gateway completes it (COMPLETED, the Unified Procedure Step Performed
  Procedure Sequence's Output Information naming the delivered SR/SEG instances) or cancels it (CANCELED, the
  Reason For Cancellation: ``unrouted: ...``, ``out of profile: ...``, ``failed: ...``, ``cancel requested``).

What a client elsewhere can do (IHE AIW-I transactions; PS3.4 Annex CC):

- RAD-80 Create UPS Workitem: N-CREATE (UPS Push), SCHEDULED, its Input Information Sequence naming one series
  the gateway has received or will receive (the gateway then performs it when that series arrives);
- RAD-81 Query UPS Workitems: C-FIND (UPS Pull/Watch/Query); RAD-83 Get UPS Workitem Contents: N-GET of one
  work item;
- RAD-82 Claim UPS Workitem and RAD-85 Complete UPS Workitem: N-ACTION Change UPS State (IN PROGRESS with the
  claimant's Transaction UID; COMPLETED or CANCELED with it);
- RAD-84 Update UPS Workitem: N-SET (SCHEDULED, or IN PROGRESS with the right Transaction UID);
- RAD-86 Manage UPS Subscription: N-ACTION subscribe (one work item, or global), unsubscribe, suspend
  global; RAD-87 Send UPS Notification: N-EVENT-REPORT (UPS State Report, UPS Cancel Requested) to each
  subscriber, from a durable outbox (an event not yet confirmed is sent again after a restart);
- RAD-88 Request UPS Workitem Cancellation: N-ACTION Request Cancel.

Every value a peer sends is checked: UIDs, the state transition (PS3.4 Table CC.1.1-2: 0xC300 final state,
0xC301 wrong Transaction UID, 0xC302 already IN PROGRESS, 0xC303 SCHEDULED only by N-CREATE, 0xC304 final
state requirements, 0xC307 unknown work item, 0xC308 unknown receiving AE, 0xC309 created not SCHEDULED, 0xC310
not IN PROGRESS, 0xC311 already COMPLETED, 0xC313 the performer (the gateway) will not cancel: results already on
their way). The Transaction UID is never returned (N-GET, C-FIND). Audit events name work items and series only
by their HMAC under the site key; nothing from a work item is printed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import random
import re
import threading
import time
from collections.abc import Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.dsutils import decode, encode

from medlens.errors import ConfigError
from medlens.gateway.audit import AuditLog
from medlens.gateway.config import GatewayConfig, Ups
from medlens.gateway.queue import Queue
from medlens.gateway.worker import Worker
from medlens.io import net

SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
GLOBAL = "1.2.840.10008.5.1.4.34.5"            # UPS Global Subscription SOP Instance
FILTERED_GLOBAL = "1.2.840.10008.5.1.4.34.5.1"  # UPS Filtered Global Subscription SOP Instance (not supported)
# UPS SOP Classes (PS3.4 CC.3.1): Push, Watch, Pull, Event, Query
PUSH, WATCH, PULL, EVENT, QUERY = (f"1.2.840.10008.5.1.4.34.6.{i}" for i in range(1, 6))
UPS_CLASSES = (PUSH, PULL, WATCH, QUERY)

# N-ACTION Action Type IDs (PS3.4 CC.2.2, CC.2.3)
CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL = 1, 2, 3, 4, 5
# N-EVENT-REPORT Event Type IDs (PS3.4 CC.2.4)
STATE_REPORT, CANCEL_REQUESTED = 1, 2

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE, PROCESSING_FAILURE, DUPLICATE_INSTANCE = 0x0106, 0x0110, 0x0111
NO_SUCH_ACTION, MISSING_ATTRIBUTE, MISSING_VALUE = 0x0123, 0x0120, 0x0121
NO_SUCH_ARGUMENT, INVALID_ARGUMENT = 0x0114, 0x0115
ALREADY_CANCELED_W, ALREADY_COMPLETED_W = 0xB304, 0xB306
MAY_NO_LONGER_BE_UPDATED, WRONG_TRANSACTION, ALREADY_IN_PROGRESS = 0xC300, 0xC301, 0xC302
ONLY_BY_CREATE, FINAL_STATE_REQUIREMENTS, NO_SUCH_UPS, UNKNOWN_AE = 0xC303, 0xC304, 0xC307, 0xC308
NOT_SCHEDULED, NOT_IN_PROGRESS, ALREADY_COMPLETED, WILL_NOT_CANCEL = 0xC309, 0xC310, 0xC311, 0xC313
UNABLE_TO_PROCESS = 0xC000
PENDING = 0xFF00

MAX_REFERENCES = 10_000  # referenced instances in one work item's Input Information
#: attributes a client may not change with N-SET (the state moves only by N-ACTION; identity never)
PROTECTED = ("SOPClassUID", "SOPInstanceUID", "ProcedureStepState", "TransactionUID")
#: C-FIND keys matched (single value, or a list of UIDs); any other key is returned, not matched
MATCHED = ("SOPInstanceUID", "ProcedureStepState", "ScheduledProcedureStepPriority", "WorklistLabel",
           "ProcedureStepLabel", "InputReadinessState")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ups (
    uid TEXT PRIMARY KEY, series_uid TEXT, study_uid TEXT, state TEXT NOT NULL, txn TEXT, performer TEXT,
    created_by TEXT NOT NULL, reason TEXT, dataset BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ups_series ON ups(series_uid);
CREATE TABLE IF NOT EXISTS ups_subscriptions (
    uid TEXT NOT NULL, aet TEXT NOT NULL, deletion_lock INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(uid, aet));
CREATE TABLE IF NOT EXISTS ups_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, aet TEXT NOT NULL, event_type INTEGER NOT NULL,
    info BLOB NOT NULL, sent INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
    last_error TEXT);
CREATE TABLE IF NOT EXISTS ups_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _enc(ds: Dataset) -> bytes:
    b = encode(ds, True, True)
    if b is None:
        raise ValueError("cannot encode the work item")
    return b


def _dec(b: bytes) -> Dataset:
    return decode(io.BytesIO(b), True, True)


def _uid(v) -> str | None:
    s = str(v) if v is not None else ""
    return s if 0 < len(s) <= 64 and re.fullmatch(net.RE_VALID_UID, s) else None


def _now_dt() -> str:
    return dt.datetime.now().strftime("%Y%m%d%H%M%S")


class Refused(Exception):
    """A request refused with a DICOM status (the comment goes back to the peer as Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment[:64]


# ------------------------------------------------------------------------------------------ the store


class UpsStore:
    """The work items, subscriptions and event outbox, in the gateway's queue file (its lock, its
    transactions): tables ``ups``, ``ups_subscriptions``, ``ups_events``, ``ups_meta`` created when missing."""

    def __init__(self, queue: Queue, wake: threading.Event | None = None) -> None:
        self.queue, self.wake = queue, wake
        with queue.lock:
            queue.db.executescript(SCHEMA)
        with queue.tx() as db:
            db.execute("INSERT OR IGNORE INTO ups_meta(key, value) VALUES ('since', ?)", (repr(time.time()),))
        (since,) = queue.query("SELECT value FROM ups_meta WHERE key='since'")[0]
        self.since = float(since)  # series first seen before the worklist existed get no work item

    def row(self, uid: str) -> dict | None:
        rows = self.queue.query("SELECT uid, series_uid, study_uid, state, txn, performer, created_by, reason, dataset "
                               "FROM ups WHERE uid=?", (uid,))
        if not rows:
            return None
        keys = ("uid", "series_uid", "study_uid", "state", "txn", "performer", "created_by", "reason", "dataset")
        return dict(zip(keys, rows[0]))

    def dataset(self, uid: str) -> Dataset | None:
        r = self.row(uid)
        return _dec(r["dataset"]) if r else None

    def enqueue(self, db, uid: str, event_type: int, info: Dataset, only: str | None = None) -> None:
        """Queue one event report for each subscriber of ``uid`` (or of every work item), or for ``only``."""
        if only is not None:
            aets = [only]
        else:
            aets = [r[0] for r in db.execute("SELECT DISTINCT aet FROM ups_subscriptions WHERE uid IN (?, ?) "
                                             "ORDER BY aet", (uid, GLOBAL)).fetchall()]
        for aet in aets:
            db.execute("INSERT INTO ups_events(uid, aet, event_type, info, next_at) VALUES (?,?,?,?,?)",
                       (uid, aet, event_type, _enc(info), time.time()))
        if aets and self.wake is not None:
            self.wake.set()  # after the caller's commit the sender finds them (at worst one round later)

    @staticmethod
    def state_info(ds: Dataset) -> Dataset:
        """The UPS State Report's Event Information (PS3.4 Table CC.2.4-1)."""
        info = Dataset()
        info.ProcedureStepState = ds.ProcedureStepState
        info.InputReadinessState = ds.get("InputReadinessState", "READY")
        if ds.ProcedureStepState == CANCELED:
            progress = ds.get("ProcedureStepProgressInformationSequence")
            reason = progress[0].get("ReasonForCancellation", "") if progress else ""
            if reason:
                info.ReasonForCancellation = reason
        return info

    def write(self, db, uid: str, ds: Dataset, *, owner: tuple[str, str] | None = None, reason: str | None = None,
              report: bool = True) -> None:
        """Store a work item's new data set (and state; ``owner``: the claim's (Transaction UID, performer AE));
        a state report queued for its subscribers."""
        sets, args = ["state=?", "dataset=?", "updated_at=?"], [str(ds.ProcedureStepState), _enc(ds), time.time()]
        if owner is not None:
            sets += ["txn=?", "performer=?"]
            args += list(owner)
        if reason is not None:
            sets.append("reason=?")
            args.append(reason)
        db.execute(f"UPDATE ups SET {', '.join(sets)} WHERE uid=?", (*args, uid))
        if report:
            self.enqueue(db, uid, STATE_REPORT, self.state_info(ds))


# ------------------------------------------------------------------------------------------ work items


def _input_information(study: str, series: str, refs: list[tuple[str, str]], aet: str) -> Sequence:
    item = Dataset()
    item.TypeOfInstances = "DICOM"
    item.StudyInstanceUID, item.SeriesInstanceUID = study, series
    sops = []
    for cls, sop in refs:
        r = Dataset()
        if cls:
            r.ReferencedSOPClassUID = cls
        r.ReferencedSOPInstanceUID = sop
        sops.append(r)
    item.ReferencedSOPSequence = Sequence(sops)
    where = Dataset()
    where.RetrieveAETitle = aet
    item.DICOMRetrievalSequence = Sequence([where])
    return Sequence([item])


def new_workitem(uid: str, study: str, series: str, refs: list[tuple[str, str]], aet: str, label: str) -> Dataset:
    """A work item the gateway schedules for a series it received (no patient attributes: the UPS names the
    series by UID only)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = PUSH, uid
    ds.ProcedureStepState, ds.InputReadinessState = SCHEDULED, "READY"
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = label[:64]
    ds.WorklistLabel = aet
    ds.ScheduledProcedureStepStartDateTime = _now_dt()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.AdmissionID, ds.IssuerOfAdmissionIDSequence = "", Sequence()
    ds.ReferencedRequestSequence = Sequence()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "110001", "DCM", "Image Processing"
    ds.ScheduledWorkitemCodeSequence = Sequence([code])
    ds.InputInformationSequence = _input_information(study, series, refs, aet)
    ds.ScheduledStationNameCodeSequence = Sequence()
    ds.ScheduledProcessingParametersSequence = Sequence()
    ds.ProcedureStepProgressInformationSequence = Sequence()
    return ds


def check_new_workitem(ds: Dataset, uid: str) -> tuple[str, str]:
    """Validate a client's N-CREATE attribute list (raises ``Refused``); returns (study, series) of its input."""
    state = str(ds.get("ProcedureStepState", ""))
    if state != SCHEDULED:
        raise Refused(NOT_SCHEDULED, "Procedure Step State must be SCHEDULED")
    if str(ds.get("TransactionUID", "") or ""):
        raise Refused(INVALID_ATTRIBUTE_VALUE, "Transaction UID must be empty at creation")
    if "SOPInstanceUID" in ds and str(ds.SOPInstanceUID or "") not in ("", uid):
        raise Refused(INVALID_ATTRIBUTE_VALUE, "SOP Instance UID differs from the Affected SOP Instance UID")
    prio = str(ds.get("ScheduledProcedureStepPriority", "") or "")
    if prio and prio not in ("HIGH", "MEDIUM", "LOW"):
        raise Refused(INVALID_ATTRIBUTE_VALUE, "Scheduled Procedure Step Priority not HIGH/MEDIUM/LOW")
    inputs = ds.get("InputInformationSequence")
    if not inputs:
        raise Refused(MISSING_ATTRIBUTE, "Input Information Sequence missing or empty")
    pairs, n = set(), 0
    for item in inputs:
        study, series = _uid(item.get("StudyInstanceUID")), _uid(item.get("SeriesInstanceUID"))
        if study is None or series is None:
            raise Refused(INVALID_ATTRIBUTE_VALUE, "an input has no valid Study/Series Instance UID")
        pairs.add((study, series))
        for r in item.get("ReferencedSOPSequence") or []:
            n += 1
            if _uid(r.get("ReferencedSOPInstanceUID")) is None or (
                    "ReferencedSOPClassUID" in r and _uid(r.ReferencedSOPClassUID) is None):
                raise Refused(INVALID_ATTRIBUTE_VALUE, "an input reference is not a valid UID")
    if n > MAX_REFERENCES:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"more than {MAX_REFERENCES} input references")
    if len(pairs) != 1:
        raise Refused(INVALID_ATTRIBUTE_VALUE, "the gateway performs work items on one series")
    return next(iter(pairs))


def _progress(ds: Dataset) -> Dataset:
    seq = ds.get("ProcedureStepProgressInformationSequence")
    if not seq:
        ds.ProcedureStepProgressInformationSequence = Sequence([Dataset()])
        seq = ds.ProcedureStepProgressInformationSequence
    return seq[0]


def _canceled(ds: Dataset, reason: str) -> None:
    ds.ProcedureStepState = CANCELED
    p = _progress(ds)
    p.ProcedureStepCancellationDateTime = _now_dt()
    p.ReasonForCancellation = reason[:1024]


def _completed(ds: Dataset, outputs: list[tuple[str, str, str, str]], aet: str) -> None:
    ds.ProcedureStepState = COMPLETED
    _progress(ds).ProcedureStepProgress = 100
    performed = Dataset()
    performed.PerformedProcedureStepStartDateTime = ds.get("ScheduledProcedureStepStartDateTime", _now_dt())
    performed.PerformedProcedureStepEndDateTime = _now_dt()
    station = Dataset()
    station.CodeValue, station.CodingSchemeDesignator, station.CodeMeaning = aet, "99MEDLENS", "medlens gateway"
    performed.PerformedStationNameCodeSequence = Sequence([station])
    performed.PerformedWorkitemCodeSequence = ds.get("ScheduledWorkitemCodeSequence", Sequence())
    by_series: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for cls, sop, series, study in outputs:
        by_series.setdefault((study, series), []).append((cls, sop))
    items = []
    for (study, series), refs in by_series.items():
        items += list(_input_information(study, series, refs, aet))
    performed.OutputInformationSequence = Sequence(items)
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])


# ------------------------------------------------------------------------------------------ the service


def check_config(cfg: GatewayConfig, source=None) -> None:
    """The worklist's settings against the rest of the config (a one-line ConfigError): event reports to another
    host are plain DIMSE, refused unless ``allow_unencrypted`` (the io.net rule)."""
    for aet, where in (cfg.ups.subscribers if cfg.ups is not None else {}).items():
        host = where.rpartition(":")[0]
        if not cfg.allow_unencrypted and not net.is_local(host):
            raise ConfigError(f"ups.subscribers: {aet} at {host}: DIMSE to another host is not encrypted; set "
                              "allow_unencrypted: true to allow it", source)


class UpsService:
    """The UPS SCP's handlers and the gateway's side of the worklist (see the module's docstring)."""

    def __init__(self, cfg: GatewayConfig, queue: Queue, audit: AuditLog, say: Callable[[str], None] | None = None,
                 source=None) -> None:
        self.cfg, self.queue, self.audit = cfg, queue, audit
        self.settings: Ups = cfg.ups or Ups()
        self.say = say or (lambda _line: None)
        self.aet = cfg.listen.ae_title
        check_config(cfg, source)
        self.rng = random.Random()
        self.lock = threading.Lock()  # one state change at a time (SCP threads and the worker)
        self.wake = threading.Event()  # a state change: the sender thread sends now
        self.store = UpsStore(queue, self.wake)

    # -------------------------------------------------------------------------------------- the SCP

    def attach(self, server) -> None:
        """Add the UPS contexts and handlers to the gateway's running association server (same AE, same port,
        same calling-AE allow-list)."""
        server.contexts.extend(build_context(c) for c in UPS_CLASSES)
        for event, handler in ((evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_GET, self.on_get),
                               (evt.EVT_N_SET, self.on_set), (evt.EVT_N_ACTION, self.on_action),
                               (evt.EVT_C_FIND, self.on_find)):
            server.bind(event, handler)

    @staticmethod
    def _failed(e: Exception) -> Dataset:
        st = Dataset()
        if isinstance(e, Refused):
            st.Status, st.ErrorComment = e.status, e.comment
        else:
            st.Status, st.ErrorComment = PROCESSING_FAILURE, type(e).__name__[:64]
        return st

    @staticmethod
    def _calling(event) -> str:
        return str(event.assoc.requestor.ae_title).strip()

    def _audit(self, kind: str, uid: str, **fields) -> None:
        self.audit.event(kind, workitem=self.audit.hash(uid), **fields)

    def on_create(self, event):
        """RAD-80: N-CREATE of a SCHEDULED work item (UPS Push)."""
        try:
            if str(event.request.AffectedSOPClassUID) != PUSH:
                raise Refused(0x0118, "work items are created with UPS Push")
            uid = _uid(event.request.AffectedSOPInstanceUID)
            if uid is None:
                raise Refused(INVALID_ATTRIBUTE_VALUE, "Affected SOP Instance UID missing or invalid")
            try:
                ds = event.attribute_list
            except Exception:
                raise Refused(INVALID_ATTRIBUTE_VALUE, "the attribute list cannot be decoded") from None
            study, series = check_new_workitem(ds, uid)
            ds.SOPClassUID, ds.SOPInstanceUID = PUSH, uid
            ds.InputReadinessState = ds.get("InputReadinessState") or "READY"
            if "TransactionUID" in ds:
                del ds.TransactionUID
            calling = self._calling(event)
            with self.lock, self.queue.tx() as db:
                if db.execute("SELECT 1 FROM ups WHERE uid=?", (uid,)).fetchone():
                    raise Refused(DUPLICATE_INSTANCE, "a work item with this UID exists")
                now = time.time()
                db.execute("INSERT INTO ups(uid, series_uid, study_uid, state, created_by, dataset, created_at, "
                           "updated_at) VALUES (?,?,?,?,?,?,?,?)", (uid, series, study, SCHEDULED, calling, _enc(ds),
                                                                    now, now))
                self.store.enqueue(db, uid, STATE_REPORT, self.store.state_info(ds))
            self._audit("ups_created", uid, calling_aet=calling, series=series, study=study)
            return SUCCESS, None
        except Exception as e:
            return self._failed(e), None

    def _public(self, ds: Dataset) -> Dataset:
        if "TransactionUID" in ds:
            del ds.TransactionUID  # never returned: only the performer knows it (PS3.4 Annex CC)
        return ds

    def on_get(self, event):
        """RAD-83: N-GET of a work item, all attributes or those asked for."""
        try:
            uid = _uid(event.request.RequestedSOPInstanceUID)
            ds = self.store.dataset(uid) if uid else None
            if ds is None:
                raise Refused(NO_SUCH_UPS, "no such work item")
            ds = self._public(ds)
            wanted = list(event.request.AttributeIdentifierList or [])
            if wanted:
                out = Dataset()
                for tag in wanted:
                    if tag in ds:
                        out.add(ds[tag])
                ds = out
            return SUCCESS, ds
        except Exception as e:
            return self._failed(e), None

    def on_set(self, event):
        """RAD-84: N-SET of a SCHEDULED work item, or an IN PROGRESS one with its Transaction UID."""
        try:
            uid = _uid(event.request.RequestedSOPInstanceUID)
            if uid is None:
                raise Refused(NO_SUCH_UPS, "no such work item")
            try:
                mods = event.modification_list
            except Exception:
                raise Refused(INVALID_ATTRIBUTE_VALUE, "the modification list cannot be decoded") from None
            with self.lock, self.queue.tx() as db:
                row = self.store.row(uid)
                if row is None:
                    raise Refused(NO_SUCH_UPS, "no such work item")
                if row["state"] in (COMPLETED, CANCELED):
                    raise Refused(MAY_NO_LONGER_BE_UPDATED, f"the work item is {row['state']}")
                if row["state"] == IN_PROGRESS and str(mods.get("TransactionUID", "") or "") != row["txn"]:
                    raise Refused(WRONG_TRANSACTION, "the Transaction UID is wrong or missing")
                ds = _dec(row["dataset"])
                for elem in mods:
                    if elem.keyword in PROTECTED:
                        if elem.keyword == "TransactionUID":
                            continue
                        raise Refused(INVALID_ATTRIBUTE_VALUE, f"{elem.keyword} cannot be set by N-SET")
                    if elem.keyword == "InputInformationSequence" and row["state"] != SCHEDULED:
                        raise Refused(INVALID_ATTRIBUTE_VALUE, "the input is fixed once the work item is claimed")
                    ds[elem.tag] = elem
                series = row["series_uid"]
                if "InputInformationSequence" in mods:  # still SCHEDULED: the series it names may change
                    _, series = check_new_workitem(ds, uid)
                db.execute("UPDATE ups SET dataset=?, series_uid=?, updated_at=? WHERE uid=?",
                           (_enc(ds), series, time.time(), uid))
            self._audit("ups_updated", uid, calling_aet=self._calling(event))
            return SUCCESS, None
        except Exception as e:
            return self._failed(e), None

    def on_find(self, event):
        """RAD-81: C-FIND of the worklist; matched keys: SOP Instance UID (a list), Procedure Step State,
        priority, worklist and step labels, input readiness; every other key asked for is returned."""
        try:
            ident = event.identifier
        except Exception:
            yield 0xA900, None
            return
        try:
            want = {e.keyword: str(e.value) for e in ident
                    if e.keyword in MATCHED and e.VR != "SQ" and e.value and str(e.value) != "*"}
            rows = self.queue.query("SELECT dataset FROM ups ORDER BY created_at")
            for (blob,) in rows:
                ds = self._public(_dec(blob))
                ok = True
                for k, v in want.items():
                    have = str(ds.get(k, ""))
                    values = v.split("\\") if k == "SOPInstanceUID" else [v]
                    if have not in values:
                        ok = False
                        break
                if not ok:
                    continue
                out = Dataset()
                for e in ident:
                    if e.tag in ds:
                        out.add(ds[e.tag])
                    elif e.keyword != "TransactionUID":
                        out.add(e)  # asked for, not held: returned empty as sent
                out.SOPInstanceUID = ds.SOPInstanceUID
                yield PENDING, out
        except Exception:
            yield UNABLE_TO_PROCESS, None
            return
        yield SUCCESS, None

    def on_action(self, event):
        """RAD-82/85 (claim, complete: change state), RAD-86 (subscribe, unsubscribe, suspend), RAD-88 (request
        cancel)."""
        try:
            kind = event.action_type
            uid = str(event.request.RequestedSOPInstanceUID or "")
            try:
                info = event.action_information or Dataset()
            except Exception:
                raise Refused(INVALID_ARGUMENT, "the action information cannot be decoded") from None
            calling = self._calling(event)
            if kind == CHANGE_STATE:
                return self.change_state(uid, info, calling)
            if kind == REQUEST_CANCEL:
                return self.request_cancel(uid, info, calling)
            if kind in (SUBSCRIBE, UNSUBSCRIBE, SUSPEND_GLOBAL):
                return self.subscription(kind, uid, info, calling)
            raise Refused(NO_SUCH_ACTION, "no such action")
        except Exception as e:
            return self._failed(e), None

    def change_state(self, uid: str, info: Dataset, calling: str):
        """N-ACTION Change UPS State (PS3.4 Table CC.1.1-2)."""
        want = str(info.get("ProcedureStepState", "") or "")
        txn = str(info.get("TransactionUID", "") or "")
        if want not in STATES:
            raise Refused(INVALID_ARGUMENT, "Procedure Step State is not a UPS state")
        if want == SCHEDULED:
            raise Refused(ONLY_BY_CREATE, "SCHEDULED only by N-CREATE")
        if _uid(txn) is None:
            raise Refused(INVALID_ARGUMENT, "Transaction UID missing or not a UID")
        with self.lock, self.queue.tx() as db:
            row = self.store.row(uid) if _uid(uid) else None
            if row is None:
                raise Refused(NO_SUCH_UPS, "no such work item")
            state = row["state"]
            ds = _dec(row["dataset"])
            if want == IN_PROGRESS:
                if state == IN_PROGRESS:
                    raise Refused(ALREADY_IN_PROGRESS, "already IN PROGRESS")
                if state != SCHEDULED:
                    raise Refused(MAY_NO_LONGER_BE_UPDATED, f"the work item is {state}")
                ds.ProcedureStepState = IN_PROGRESS
                self.store.write(db, uid, ds, owner=(txn, calling))
                status = SUCCESS
            else:
                if state == SCHEDULED:
                    raise Refused(NOT_IN_PROGRESS, "not IN PROGRESS")
                if state == want:
                    return (ALREADY_COMPLETED_W if want == COMPLETED else ALREADY_CANCELED_W), None
                if state != IN_PROGRESS:
                    raise Refused(MAY_NO_LONGER_BE_UPDATED, f"the work item is {state}")
                if txn != row["txn"]:
                    raise Refused(WRONG_TRANSACTION, "wrong Transaction UID")
                if want == COMPLETED and not ds.get("UnifiedProcedureStepPerformedProcedureSequence"):
                    raise Refused(FINAL_STATE_REQUIREMENTS, "no Performed Procedure Sequence set (N-SET)")
                ds.ProcedureStepState = want
                if want == CANCELED:
                    _canceled(ds, str(_progress(ds).get("ReasonForCancellation", "") or f"canceled by {calling}"))
                self.store.write(db, uid, ds, reason=None if want == COMPLETED else f"canceled by {calling}")
                status = SUCCESS
        self._audit("ups_state", uid, calling_aet=calling, state=want)
        return status, None

    def request_cancel(self, uid: str, info: Dataset, calling: str):
        """N-ACTION Request Cancel: a SCHEDULED work item is canceled at once (through IN PROGRESS); one the
        gateway performs is canceled when none of its series' jobs has results on their way (else 0xC313);
        one another performer claimed gets a UPS Cancel Requested event."""
        reason = str(info.get("ReasonForCancellation", "") or "")[:1024]
        text = f"cancel requested by {calling}" + (f": {reason}" if reason else "")
        with self.lock, self.queue.tx() as db:
            row = self.store.row(uid) if _uid(uid) else None
            if row is None:
                raise Refused(NO_SUCH_UPS, "no such work item")
            state, ds = row["state"], _dec(row["dataset"])
            if state == COMPLETED:
                raise Refused(ALREADY_COMPLETED, "already COMPLETED")
            if state == CANCELED:
                return ALREADY_CANCELED_W, None
            if state == IN_PROGRESS and row["performer"] != self.aet:
                ev = Dataset()
                ev.ReasonForCancellation = reason
                ev.RequestingAE = calling
                self.store.enqueue(db, uid, CANCEL_REQUESTED, ev)
                self._audit("ups_cancel_requested", uid, calling_aet=calling)
                return SUCCESS, None
            if state == IN_PROGRESS and row["series_uid"] is not None:
                if not self.queue.cancel_open_jobs(db, row["series_uid"], text):
                    raise Refused(WILL_NOT_CANCEL, "results already on their way")
            if state == SCHEDULED:
                ds.ProcedureStepState = IN_PROGRESS
                self.store.write(db, uid, ds, owner=(generate_uid(), self.aet))
            _canceled(ds, text)
            self.store.write(db, uid, ds, reason=text)
        self._audit("ups_state", uid, calling_aet=calling, state=CANCELED, reason="cancel requested")
        return SUCCESS, None

    def subscription(self, kind: int, uid: str, info: Dataset, calling: str):
        """Subscribe (one work item or global; 0xC308 for a receiving AE the config does not list),
        unsubscribe, suspend the global subscription."""
        aet = str(info.get("ReceivingAE", "") or "").strip() or calling
        if kind == SUBSCRIBE and aet not in self.settings.subscribers:
            raise Refused(UNKNOWN_AE, "receiving AE unknown to this SCP")
        if uid == FILTERED_GLOBAL:
            raise Refused(NO_SUCH_UPS, "filtered global subscription not supported")
        with self.lock, self.queue.tx() as db:
            if uid != GLOBAL and (_uid(uid) is None or not self.store.row(uid)):
                raise Refused(NO_SUCH_UPS, "no such work item")
            if kind == SUBSCRIBE:
                lock = str(info.get("DeletionLock", "") or "").upper()
                if lock not in ("", "TRUE", "FALSE"):
                    raise Refused(INVALID_ARGUMENT, "Deletion Lock is TRUE or FALSE")
                db.execute("INSERT OR REPLACE INTO ups_subscriptions(uid, aet, deletion_lock) VALUES (?,?,?)",
                           (uid, aet, int(lock == "TRUE")))
                # the initial state report(s): the work item, or every one not yet final for a global one
                rows = db.execute("SELECT uid, dataset FROM ups WHERE " + (
                    "state IN ('SCHEDULED','IN PROGRESS')" if uid == GLOBAL else "uid=?") + " ORDER BY created_at",
                    () if uid == GLOBAL else (uid,)).fetchall()
                for u, blob in rows:
                    self.store.enqueue(db, u, STATE_REPORT, self.store.state_info(_dec(blob)), only=aet)
            elif kind == UNSUBSCRIBE:
                db.execute("DELETE FROM ups_subscriptions WHERE uid=? AND aet=?", (uid, aet))
            else:
                if uid != GLOBAL:
                    raise Refused(INVALID_ARGUMENT, "suspend applies to the global subscription")
                db.execute("DELETE FROM ups_subscriptions WHERE uid=? AND aet=?", (GLOBAL, aet))
        self.audit.event("ups_subscription", action={SUBSCRIBE: "subscribe", UNSUBSCRIBE: "unsubscribe",
                                                      SUSPEND_GLOBAL: "suspend"}[kind],
                         workitem="global" if uid == GLOBAL else self.audit.hash(uid), subscriber=aet,
                         calling_aet=calling)
        return SUCCESS, None

    # -------------------------------------------------------------------------------------- the gateway's side

    def schedule(self, series_uid: str, refs: list[tuple[str, str]] | None = None) -> None:
        """A work item (SCHEDULED) for an assembled series that has none; ``refs``: (SOP Class, SOP Instance)
        of its instances (from the spool; without them, instance UIDs from the queue)."""
        study, _, _ = self.queue.series_info(series_uid)
        if refs is None:
            refs = [("", r[0]) for r in self.queue.query("SELECT sop_uid FROM instances WHERE series_uid=? AND late=0 "
                                                         "ORDER BY sop_uid", (series_uid,))]
        row = self.queue.query("SELECT rule FROM series WHERE series_uid=?", (series_uid,))
        label = f"medlens AI: {row[0][0]}" if row and row[0][0] else "medlens AI"
        with self.lock, self.queue.tx() as db:
            if db.execute("SELECT 1 FROM ups WHERE series_uid=?", (series_uid,)).fetchone():
                return
            uid = generate_uid()
            ds = new_workitem(uid, study, series_uid, refs, self.aet, label)
            now = time.time()
            db.execute("INSERT INTO ups(uid, series_uid, study_uid, state, created_by, dataset, created_at, "
                       "updated_at) VALUES (?,?,?,?,?,?,?,?)", (uid, series_uid, study, SCHEDULED, self.aet,
                                                                _enc(ds), now, now))
            self.store.enqueue(db, uid, STATE_REPORT, self.store.state_info(ds))
        self._audit("ups_created", uid, calling_aet=self.aet, series=series_uid, study=study)

    def canceled_before_routing(self, series_uid: str) -> bool:
        """Every work item naming this series was canceled by request before it was assembled."""
        states = [r[0] for r in self.queue.query("SELECT state FROM ups WHERE series_uid=?", (series_uid,))]
        return bool(states) and all(s == CANCELED for s in states)

    def sync(self) -> None:
        """Bring the work items up to the queue's state (crash-safe: derived from the series and jobs tables).
        Their event reports are sent by the sender thread (``start``)."""
        q = self.queue
        for (s,) in q.query("SELECT s.series_uid FROM series s WHERE s.state != 'receiving' AND s.first_at >= ? AND "
                           "NOT EXISTS (SELECT 1 FROM ups u WHERE u.series_uid=s.series_uid)", (self.store.since,)):
            self.schedule(s)
        rows = q.query("SELECT u.uid, u.state, u.performer, s.series_uid, s.state, s.reason FROM ups u JOIN series s "
                      "ON s.series_uid=u.series_uid WHERE s.state != 'receiving' AND (u.state='SCHEDULED' OR "
                      "(u.state='IN PROGRESS' AND u.performer=?))", (self.aet,))
        for uid, ups_state, _, series, series_state, reason in rows:
            if ups_state == SCHEDULED:
                self.claim(uid)
            if series_state == "unrouted":
                self.finish(uid, CANCELED, f"unrouted: {reason or ''}".strip())
            elif series_state in ("done", "failed"):
                self.conclude(uid, series)
        self.wake.set()

    def claim(self, uid: str) -> None:
        with self.lock, self.queue.tx() as db:
            row = self.store.row(uid)
            if row is None or row["state"] != SCHEDULED:
                return
            ds = _dec(row["dataset"])
            ds.ProcedureStepState = IN_PROGRESS
            self.store.write(db, uid, ds, owner=(generate_uid(), self.aet))
        self._audit("ups_state", uid, calling_aet=self.aet, state=IN_PROGRESS)

    def conclude(self, uid: str, series: str) -> None:
        jobs = self.queue.job_outcomes(series)
        closed = [(r, s, why) for r, s, why in jobs if s in ("delivered", "refused", "failed", "canceled")]
        if closed and all(s == "delivered" for _, s, _ in closed):
            self.finish(uid, COMPLETED, outputs=self.queue.delivered_results(series))
            return
        reasons = []
        for run, s, why in closed:
            if s == "delivered":
                continue
            what = {"refused": "out of profile", "failed": "failed", "canceled": "canceled"}[s]
            reasons.append(f"{Worker.run_label(run)}: {what}: {why or ''}".strip())
        self.finish(uid, CANCELED, "; ".join(reasons) or "no job")

    def finish(self, uid: str, state: str, reason: str = "", outputs: list | None = None) -> None:
        with self.lock, self.queue.tx() as db:
            row = self.store.row(uid)
            if row is None or row["state"] != IN_PROGRESS or row["performer"] != self.aet:
                return
            ds = _dec(row["dataset"])
            if state == COMPLETED:
                _completed(ds, outputs or [], self.aet)
            else:
                _canceled(ds, reason)
            self.store.write(db, uid, ds, reason=reason or None)
        self._audit("ups_state", uid, calling_aet=self.aet, state=state,
                    outputs=len(outputs or []) if state == COMPLETED else None)

    # -------------------------------------------------------------------------------------- event reports

    def start(self, stop: threading.Event, every_s: float) -> threading.Thread:
        """The sender thread: due event reports sent every ``every_s`` (at once after a state change), until
        ``stop``; a subscriber slow to answer never holds the worker up."""
        def loop() -> None:
            while not stop.is_set():
                self.wake.clear()
                try:
                    self.send_events()
                except Exception as e:  # never fatal: the outbox keeps the events for the next round
                    self.say(f"UPS event reports: {type(e).__name__}")
                self.wake.wait(every_s)

        t = threading.Thread(target=loop, name="ups-events", daemon=True)
        t.start()
        return t

    def send_events(self) -> None:
        """Send the due event reports, per subscriber in order, one association each; a subscriber that does
        not answer is tried again later (backoff), its later events kept behind the first."""
        now = time.time()
        due = self.queue.query("SELECT id, uid, aet, event_type, info, attempts FROM ups_events WHERE sent=0 "
                              "AND next_at <= ? ORDER BY id", (now,))
        by_aet: dict[str, list[tuple]] = {}
        for r in due:
            by_aet.setdefault(r[2], []).append(r)
        for aet, events in by_aet.items():
            where = self.settings.subscribers.get(aet)
            if where is None:  # no longer in the config: dropped
                with self.queue.tx() as db:
                    db.executemany("UPDATE ups_events SET sent=-1, last_error='subscriber not configured' "
                                   "WHERE id=?", [(e[0],) for e in events])
                continue
            self._send(aet, where, events)

    def _send(self, aet: str, where: str, events: list[tuple]) -> None:
        host, _, port = where.rpartition(":")
        ae = AE(ae_title=self.aet)
        ae.add_requested_context(EVENT)
        t = self.settings.event_timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
        ae.connection_timeout = t
        error = None
        assoc = ae.associate(host, int(port), ae_title=aet)
        try:
            if not assoc.is_established:
                error = "association refused or not answered"
            else:
                for eid, uid, _, etype, info, _ in events:
                    status, _ = assoc.send_n_event_report(_dec(info), etype, EVENT, uid)
                    code = getattr(status, "Status", None)
                    if code is None or code != SUCCESS:
                        error = "no answer" if code is None else f"status 0x{int(code):04X}"
                        break
                    with self.queue.tx() as db:
                        db.execute("UPDATE ups_events SET sent=1, attempts=attempts+1 WHERE id=?", (eid,))
        finally:
            with contextlib.suppress(Exception):
                if assoc.is_established:
                    assoc.release()
        if error is not None:
            first = next(e for e in events if not self.queue.query("SELECT 1 FROM ups_events WHERE id=? AND sent=1",
                                                                  (e[0],)))
            wait = min(60.0, 1.0 * 2 ** min(first[5], 6)) * self.rng.uniform(0.5, 1.5)
            with self.queue.tx() as db:
                db.execute("UPDATE ups_events SET attempts=attempts+1, last_error=?, next_at=? WHERE sent=0 AND aet=?",
                           (error, time.time() + wait, aet))
            if first[5] == 0:
                self.say(f"UPS event reports to {aet}: {error}; retried in {wait:.0f} s")


class UpsWorker(Worker):
    """The worker with the worklist: a series' work item is scheduled and claimed as soon as the series is
    assembled (its spooled files still there to name the instances' SOP classes); a series whose every work item
    was canceled by request before it completed is recorded as unrouted (canceled), not predicted."""

    ups: UpsService

    def assemble(self, series_uid: str) -> None:
        if self.ups.canceled_before_routing(series_uid):
            reason = "its work item was canceled before the series was complete"
            self.queue.unroute(series_uid, reason)
            study, _, _ = self.queue.series_info(series_uid)
            self.audit.event("unrouted", study=study, series=series_uid, reason=reason)
            return
        super().assemble(series_uid)
        refs = []
        for f in self.queue.series_files(series_uid):
            with contextlib.suppress(Exception):
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
                cls, sop = _uid(ds.get("SOPClassUID")), _uid(ds.get("SOPInstanceUID"))
                if sop:
                    refs.append((cls or "", sop))
        self.ups.schedule(series_uid, refs or None)
        self.ups.sync()
