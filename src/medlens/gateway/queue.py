"""The gateway's durable queue: one SQLite file in WAL mode with ``synchronous=FULL`` (a committed transaction
survives a power cut), one table each for received instances, series, jobs (one per routed series x run),
delivery attempts and deliveries. Every state change is one transaction.

Life cycle::

    instance received  -> series 'receiving' (last arrival time kept)
    quiet period over  -> series 'routed' (one job per run of the matching rule) or 'unrouted' (the reason)
    job 'pending'      -> 'refused' (out-of-profile reasons), 'failed' (the error), or 'delivering' (results
                          written, one delivery per destination, each 'pending')
    delivery           -> 'done' only after the destination confirmed it; retried with backoff until then
                          ('failed' after retry.max_attempts, when set)
    job 'delivering'   -> 'delivered' when every delivery is done; the series 'done' when no job is open,
                          and only then are its spooled files deleted ('failed', files kept, when a job
                          failed or a delivery was given up).
    job 'pending'      -> 'canceled' by a UPS cancel request (``gateway.ups``), only while no job of the series
                          has results on their way.

The UIDs of each job's result objects (SR, SEG) are recorded with its results (table ``results``): the UPS
worklist's output references, still known after the files are deleted. The worklist's own tables (``ups*``) live
in this file too, created by ``gateway.ups``.

Idempotent: an instance received twice (same SOP Instance UID) is one row. An instance that arrives after its
series was routed (a quiet period too short for the sender) is kept aside as 'late': recorded, kept in the spool,
shown by ``gateway status``, never predicted nor deleted (a series is answered once). A process killed at any point
restarts from the last committed state: a job caught while predicting is still 'pending' and runs again; a
delivery sent but not yet recorded is sent again, with the same SOP Instance UIDs (``worker.result_uid``), which a
PACS stores once.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from medlens.errors import DataError

UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, path TEXT NOT NULL,
    calling_aet TEXT NOT NULL, received_at REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
    late INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_aet TEXT NOT NULL, first_at REAL NOT NULL,
    last_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'receiving', rule TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL, run TEXT NOT NULL, rule TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', reason TEXT, result_dir TEXT, model TEXT, weights TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE(series_uid, run));
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, done_at REAL, last_error TEXT,
    PRIMARY KEY(job_id, destination));
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, destination TEXT NOT NULL, at REAL NOT NULL,
    ok INTEGER NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER NOT NULL, sop_class TEXT NOT NULL, sop_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL, PRIMARY KEY(job_id, sop_uid));
"""


def result_references(folder: Path) -> list[tuple[str, str, str, str]]:
    """(SOP Class, SOP Instance, Series, Study UID) of the SEG and SR files of a result folder (headers only;
    a file that cannot be read, or without valid UIDs, is left out: references are an extra, never a failure)."""
    out = []
    for f in sorted(folder.glob("*_seg.dcm")) + sorted(folder.glob("*_sr.dcm")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
            uids = tuple(str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                                                        "StudyInstanceUID"))
        except Exception:
            continue
        if all(0 < len(u) <= 64 and UID_RE.fullmatch(u) for u in uids):
            out.append(uids)
    return out


@dataclass
class Job:
    id: int
    series_uid: str
    run: str
    rule: str
    state: str
    result_dir: str | None
    model: str | None


@dataclass
class Delivery:
    job_id: int
    destination: str
    attempts: int
    result_dir: str
    series_uid: str
    run: str
    model: str | None


class Queue:
    """The queue file at ``path`` (created with its tables when new). Thread-safe: one connection behind a
    lock (the SCP's association threads and the worker share it)."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.is_file():
                    raise DataError("no gateway queue here (has the gateway run with this config?)", self.path)
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                          isolation_level=None, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"cannot open the gateway queue ({e})", self.path) from None
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def tx(self):
        """One transaction (BEGIN IMMEDIATE ... COMMIT; rolled back on any exception)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _all(self, sql: str, args=()) -> list[tuple]:
        with self.lock:
            return list(self.db.execute(sql, args).fetchall())

    def query(self, sql: str, args=()) -> list[tuple]:
        """Rows of one read (the UPS worklist's tables live in this file too: ``gateway.ups``)."""
        return self._all(sql, args)

    # ---------------------------------------------------------------------------------------------- receiving

    def add_instance(self, sop_uid: str, series_uid: str, study_uid: str, path: str, calling_aet: str,
                     now: float | None = None) -> bool:
        """Record a spooled instance; False when that SOP Instance UID was already recorded (nothing changes)."""
        now = time.time() if now is None else now
        with self.tx() as db:
            row = db.execute("SELECT state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            late = int(row is not None and row[0] != "receiving")  # after its series was routed: kept aside
            cur = db.execute("INSERT OR IGNORE INTO instances(sop_uid, series_uid, study_uid, path, calling_aet, "
                             "received_at, late) VALUES (?,?,?,?,?,?,?)",
                             (sop_uid, series_uid, study_uid, path, calling_aet, now, late))
            if cur.rowcount == 0:
                return False
            if late:
                return True
            db.execute("INSERT INTO series(series_uid, study_uid, calling_aet, first_at, last_at) VALUES (?,?,?,?,?) "
                       "ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at",
                       (series_uid, study_uid, calling_aet, now, now))
        return True

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._all("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)))

    def due_series(self, quiet_s: float, now: float | None = None) -> list[str]:
        """Series still receiving whose last instance arrived at least ``quiet_s`` ago."""
        now = time.time() if now is None else now
        return [r[0] for r in self._all("SELECT series_uid FROM series WHERE state='receiving' AND last_at <= ? "
                                        "ORDER BY first_at", (now - quiet_s,))]

    def series_info(self, series_uid: str) -> tuple[str, str, float]:
        """(study UID, calling AE, first arrival time) of a series."""
        (row,) = self._all("SELECT study_uid, calling_aet, first_at FROM series WHERE series_uid=?", (series_uid,))
        return row[0], row[1], row[2]

    def series_files(self, series_uid: str) -> list[str]:
        return [r[0] for r in self._all("SELECT path FROM instances WHERE series_uid=? AND deleted=0 AND late=0 "
                                        "ORDER BY path", (series_uid,))]

    # ---------------------------------------------------------------------------------------------- routing

    def route(self, series_uid: str, rule: str, runs: list[str]) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE series SET state='routed', rule=? WHERE series_uid=?", (rule, series_uid))
            for run in runs:
                db.execute("INSERT OR IGNORE INTO jobs(series_uid, run, rule, created_at, updated_at) "
                           "VALUES (?,?,?,?,?)", (series_uid, run, rule, now, now))

    def unroute(self, series_uid: str, reason: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE series SET state='unrouted', reason=? WHERE series_uid=?", (reason, series_uid))

    # ---------------------------------------------------------------------------------------------- jobs

    def jobs(self, state: str) -> list[Job]:
        return [Job(*r) for r in self._all("SELECT id, series_uid, run, rule, state, result_dir, model FROM jobs "
                                           "WHERE state=? ORDER BY id", (state,))]

    def job_closed(self, job_id: int, state: str, reason: str, model: str | None = None,
                   weights: str | None = None) -> None:
        """A job ends without results: 'refused' (out of profile) or 'failed' (a job canceled meanwhile, by a UPS
        cancel request, stays canceled)."""
        assert state in ("refused", "failed")
        with self.tx() as db:
            db.execute("UPDATE jobs SET state=?, reason=?, model=?, weights=?, updated_at=? WHERE id=? "
                       "AND state != 'canceled'", (state, reason, model, weights, time.time(), job_id))

    def job_predicted(self, job_id: int, result_dir: str, model: str, weights: str, destinations: list[str]) -> None:
        """Results written: the job now waits for one delivery per destination. The UIDs of its result objects
        (SR, SEG) are recorded with it (the UPS worklist's output references). A job canceled meanwhile (a UPS
        cancel request while it was predicted) stays canceled: nothing is sent."""
        now = time.time()
        refs = result_references(Path(result_dir))
        with self.tx() as db:
            cur = db.execute("UPDATE jobs SET state='delivering', result_dir=?, model=?, weights=?, updated_at=? "
                             "WHERE id=? AND state != 'canceled'", (result_dir, model, weights, now, job_id))
            if cur.rowcount == 0:
                return
            db.executemany("INSERT OR IGNORE INTO results(job_id, sop_class, sop_uid, series_uid, study_uid) "
                           "VALUES (?,?,?,?,?)", [(job_id, *r) for r in refs])
            for d in destinations:
                db.execute("INSERT OR IGNORE INTO deliveries(job_id, destination, next_at) VALUES (?,?,?)",
                           (job_id, d, now))

    def cancel_open_jobs(self, db: sqlite3.Connection, series_uid: str, reason: str) -> bool:
        """Within the caller's transaction ``db`` (``tx()``): cancel a series' jobs not yet predicted (a UPS cancel
        request); False, and nothing changed, when one already has results on their way (no calling them back)."""
        if db.execute("SELECT 1 FROM jobs WHERE series_uid=? AND state IN ('delivering','delivered')",
                      (series_uid,)).fetchone():
            return False
        db.execute("UPDATE jobs SET state='canceled', reason=?, updated_at=? WHERE series_uid=? AND state='pending'",
                   (reason, time.time(), series_uid))
        return True

    def job_outcomes(self, series_uid: str) -> list[tuple[str, str, str | None]]:
        """(run, state, reason) of each job of a series."""
        return [(r[0], r[1], r[2]) for r in self._all("SELECT run, state, reason FROM jobs WHERE series_uid=? "
                                                      "ORDER BY id", (series_uid,))]

    def delivered_results(self, series_uid: str) -> list[tuple[str, str, str, str]]:
        """(SOP Class, SOP Instance, Series, Study UID) of the result objects of a series' delivered jobs."""
        return [(r[0], r[1], r[2], r[3]) for r in self._all(
            "SELECT r.sop_class, r.sop_uid, r.series_uid, r.study_uid FROM results r JOIN jobs j ON j.id=r.job_id "
            "WHERE j.series_uid=? AND j.state='delivered' ORDER BY j.id, r.sop_uid", (series_uid,))]

    # ---------------------------------------------------------------------------------------------- delivery

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        now = time.time() if now is None else now
        rows = self._all("SELECT d.job_id, d.destination, d.attempts, j.result_dir, j.series_uid, j.run, j.model "
                         "FROM deliveries d JOIN jobs j ON j.id=d.job_id WHERE d.state='pending' AND d.next_at <= ? "
                         "ORDER BY d.next_at", (now,))
        return [Delivery(*r) for r in rows]

    def record_attempt(self, job_id: int, destination: str, ok: bool, error: str | None = None,
                       next_at: float | None = None, give_up: bool = False) -> float | None:
        """Record one delivery attempt. On success the delivery is done, and when it was the job's last open
        delivery the job is 'delivered': the arrival-to-delivery latency (s) is returned then, else None."""
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO attempts(job_id, destination, at, ok, error) VALUES (?,?,?,?,?)",
                       (job_id, destination, now, int(ok), error))
            if ok:
                db.execute("UPDATE deliveries SET state='done', attempts=attempts+1, done_at=?, last_error=NULL "
                           "WHERE job_id=? AND destination=?", (now, job_id, destination))
            else:
                db.execute("UPDATE deliveries SET state=?, attempts=attempts+1, next_at=?, last_error=? "
                           "WHERE job_id=? AND destination=?",
                           ("failed" if give_up else "pending", next_at or now, error, job_id, destination))
            open_ = db.execute("SELECT count(*) FROM deliveries WHERE job_id=? AND state='pending'",
                               (job_id,)).fetchone()[0]
            if open_:
                return None
            failed = db.execute("SELECT count(*) FROM deliveries WHERE job_id=? AND state='failed'",
                                (job_id,)).fetchone()[0]
            db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?",
                       ("failed" if failed else "delivered", now, job_id))
            if failed:
                db.execute("UPDATE jobs SET reason=? WHERE id=?", ("a destination gave up (retry.max_attempts)", job_id))
                return None
            first = db.execute("SELECT s.first_at FROM series s JOIN jobs j ON j.series_uid=s.series_uid "
                               "WHERE j.id=?", (job_id,)).fetchone()[0]
            return now - first

    # ---------------------------------------------------------------------------------------------- clean-up

    def close_finished_series(self) -> list[str]:
        """Routed series with no open job are closed: 'done' when every job was delivered or refused (their
        files may go), 'failed' when a job failed (their files are kept for the operator); returns the done."""
        with self.tx() as db:
            rows = db.execute(
                "SELECT s.series_uid, EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid=s.series_uid AND "
                "j.state='failed') FROM series s WHERE s.state='routed' AND NOT EXISTS (SELECT 1 FROM jobs j "
                "WHERE j.series_uid=s.series_uid AND j.state IN ('pending','delivering'))").fetchall()
            for s, failed in rows:
                db.execute("UPDATE series SET state=? WHERE series_uid=?", ("failed" if failed else "done", s))
        return [s for s, failed in rows if not failed]

    def result_dirs(self, series_uid: str) -> list[str]:
        return [r[0] for r in self._all("SELECT result_dir FROM jobs WHERE series_uid=? AND result_dir IS NOT NULL",
                                        (series_uid,))]

    def removable_files(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of spooled files whose series is finished (done or unrouted)."""
        return [(r[0], r[1]) for r in self._all(
            "SELECT i.sop_uid, i.path FROM instances i JOIN series s ON s.series_uid=i.series_uid "
            "WHERE i.deleted=0 AND i.late=0 AND s.state IN ('done','unrouted')")]

    def mark_deleted(self, sop_uids: list[str]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE instances SET deleted=1 WHERE sop_uid=?", [(u,) for u in sop_uids])

    # ---------------------------------------------------------------------------------------------- status

    def depth(self) -> int:
        """Work not finished: series still receiving, and open jobs."""
        (n,) = self._all("SELECT (SELECT count(*) FROM series WHERE state='receiving') + "
                         "(SELECT count(*) FROM jobs WHERE state IN ('pending','delivering'))")[0]
        return int(n)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for table in ("series", "jobs", "deliveries"):
            out[table] = {s: n for s, n in self._all(f"SELECT state, count(*) FROM {table} GROUP BY state ORDER BY state")}
        (n,) = self._all("SELECT count(*) FROM instances WHERE deleted=0 AND late=0")[0]
        (late,) = self._all("SELECT count(*) FROM instances WHERE deleted=0 AND late=1")[0]
        out["instances"] = {"spooled": int(n), **({"late": int(late)} if late else {})}
        return out

    def problems(self) -> list[dict]:
        """Unrouted series, refused and failed jobs, and deliveries waiting after a failed attempt; each with
        ``at``, when it last changed (epoch seconds)."""
        out = [{"what": "series", "id": s, "state": "unrouted", "reason": r, "at": at}
               for s, r, at in self._all("SELECT series_uid, reason, last_at FROM series WHERE state='unrouted'")]
        out += [{"what": "series", "id": s, "state": "late instances",
                 "reason": f"{n} instance(s) arrived after the series was routed; kept in the spool, not predicted",
                 "at": at}
                for s, n, at in self._all("SELECT series_uid, count(*), max(received_at) FROM instances "
                                          "WHERE late=1 AND deleted=0 GROUP BY series_uid")]
        out += [{"what": "job", "id": s, "run": run, "state": st, "reason": r, "at": at}
                for s, run, st, r, at in self._all("SELECT series_uid, run, state, reason, updated_at FROM jobs "
                                                   "WHERE state IN ('refused','failed') ORDER BY id")]
        out += [{"what": "delivery", "id": s, "run": run, "destination": d, "state": st, "attempts": a, "reason": e,
                 "at": at}
                for s, run, d, st, a, e, at in self._all(
                    "SELECT j.series_uid, j.run, d.destination, d.state, d.attempts, d.last_error, "
                    "(SELECT max(t.at) FROM attempts t WHERE t.job_id=d.job_id AND t.destination=d.destination) "
                    "FROM deliveries d JOIN jobs j ON j.id=d.job_id "
                    "WHERE d.state='failed' OR (d.state='pending' AND d.attempts > 0)")]
        return out
