"""The gateway's worker: series assembly, routing, prediction behind the out-of-profile gate, delivery, clean-up.

One ``step`` does, in order:

1. **assemble**: every series whose last instance arrived ``quiet_period_s`` ago is complete; its headers are
   matched against the routing rules in order (the first rule that matches wins). A series no rule takes is
   recorded as 'unrouted' with each rule's reason, and never reaches a model.
2. **predict**: each pending job (series x run) goes through ``workflow.interop.predict_export`` (classifiers) or
   ``segment_export`` (segmenters): ``Predictor`` behind the export gate, results built by the existing SR TID 1500
   / SEG / FHIR builders. An input outside the run's training profile is 'refused' with the reasons, and
   nothing is sent. The result objects then get UIDs derived from (series, run, weights hash) (``result_uid``),
   so results made again after a crash are the same instances, and the FHIR Bundle is made from the final SR.
3. **deliver**: each due delivery is sent (C-STORE, STOW-RS or FHIR POST) and recorded as done only after the
   destination confirmed it. A failure waits ``min(max_s, base_s * 2**attempt)`` times a jitter factor, and the
   job stays 'delivering' (``gateway status`` shows it). A crash between the send and the record sends the same
   SOP Instance UIDs again: a PACS keeps one copy (Orthanc, like most archives, ignores a second store of an
   instance it holds). A FHIR server gets the same Bundle again, whose every entry is a conditional create
   (``ifNoneExist`` on an identifier derived from the SR's UID, ``report.fhir``): it creates nothing twice.
4. **clean up**: a routed series with no open job is 'done'; its spooled files and results are deleted then,
   and an unrouted series' files at once; never before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from fhir.resources.bundle import Bundle

from medlens.errors import MedlensError
from medlens.gateway.audit import AuditLog
from medlens.gateway.config import Destination, GatewayConfig, Match, Rule
from medlens.gateway.drift import DriftMonitor
from medlens.gateway.metrics import GatewayMetrics
from medlens.gateway.queue import Delivery, Job, Queue
from medlens.gateway.shadow import ShadowRecorder, check_shadows
from medlens.io.pacs import connect
from medlens.report.fhir import post_bundle
from medlens.run import Predictor, Run
from medlens.run.profile import OutOfProfile
from medlens.tasks import task_of
from medlens.workflow.interop import predict_export, segment_export, write_bundle_file

#: test aid (fault injection): exit right after a destination confirmed a delivery, before it is recorded
EXIT_AFTER_SEND_ENV = "MEDLENS_GATEWAY_EXIT_AFTER_SEND"
DRIFT_HISTORY = 500  # points of each run's drift statistics kept for the status page's plot


def result_uid(*parts: str) -> str:
    """A DICOM UID (2.25 form) fixed by ``parts``: the same series, run and weights give the same result UIDs."""
    digest = hashlib.sha256("|".join(("medlens-gateway", *parts)).encode("utf-8")).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def _remap_uids(ds, mapping: dict[str, str]) -> None:
    """Replace every UI value of ``ds`` (nested sequences and file meta included) found in ``mapping``."""
    for elem in ds.iterall():
        if elem.VR == "UI" and isinstance(elem.value, str) and elem.value in mapping:
            elem.value = mapping[elem.value]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPInstanceUID", "")) in mapping:
        meta.MediaStorageSOPInstanceUID = mapping[str(meta.MediaStorageSOPInstanceUID)]


def fix_result_uids(folder: Path, series_uid: str, run_key: str, weights: str) -> None:
    """Give the SR/SEG files of a result folder UIDs fixed by (series, run, weights), references between them
    kept, and remake each FHIR Bundle from its final SR."""
    files = sorted(folder.glob("*_seg.dcm")) + sorted(folder.glob("*_sr.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    mapping: dict[str, str] = {}
    for f, ds in zip(files, datasets):
        kind = f.stem.rsplit("_", 1)[-1]
        mapping[str(ds.SOPInstanceUID)] = result_uid(kind, series_uid, run_key, weights, f.name)
        mapping[str(ds.SeriesInstanceUID)] = result_uid(kind + "-series", series_uid, run_key, weights)
    for f, ds in zip(files, datasets):
        _remap_uids(ds, mapping)
        ds.save_as(f, enforce_file_format=True)
    for sr in folder.glob("*_sr.dcm"):
        fhir = sr.with_name(sr.name.removesuffix("_sr.dcm") + "_fhir.json")
        if fhir.exists():
            write_bundle_file(sr, fhir)


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def series_features(files: list[str]) -> dict:
    """What the routing rules look at, from the first instance's header (no pixel data) and the count."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    sp = [_float(v) for v in spacing] if spacing is not None else []
    sp = [v for v in sp if v is not None]
    return {"modality": str(ds.get("Modality", "")).upper(), "body_part": str(ds.get("BodyPartExamined", "")).upper(),
            "sop_class_uid": str(ds.get("SOPClassUID", "")), "series_description": str(ds.get("SeriesDescription", "")),
            "pixel_spacing_mm": min(sp) if sp else None, "slices": len(files)}


def mismatch(match: Match, f: dict) -> str | None:
    """Why a series (its ``series_features``) does not match, or None when it does."""
    if match.modality is not None and f["modality"] not in match.modality:
        return f"modality {f['modality'] or 'unknown'} not in {match.modality}"
    if match.body_part is not None and f["body_part"] not in match.body_part:
        return f"body part {f['body_part'] or 'unknown'} not in {match.body_part}"
    if match.sop_class_uid is not None and f["sop_class_uid"] not in match.sop_class_uid:
        return f"SOP class {f['sop_class_uid'] or 'unknown'} not in the rule's"
    if match.series_description is not None and not re.search(match.series_description, f["series_description"]):
        return f"series description does not match /{match.series_description}/"
    if match.pixel_spacing_mm is not None and not match.pixel_spacing_mm.holds(f["pixel_spacing_mm"]):
        return f"pixel spacing {f['pixel_spacing_mm']} mm outside the rule's range"
    if match.slices is not None and not match.slices.holds(f["slices"]):
        return f"{f['slices']} instance(s), outside the rule's range"
    return None


def choose_rule(rules: list[Rule], f: dict) -> tuple[Rule | None, str]:
    """The first rule that matches, or None and every rule's reason."""
    reasons = []
    for r in rules:
        why = mismatch(r.match, f)
        if why is None:
            return r, ""
        reasons.append(f"{r.name}: {why}")
    return None, "no routing rule matched (" + "; ".join(reasons) + ")"


def backoff(attempt: int, base_s: float, max_s: float, jitter: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based): exponential, capped, jittered."""
    return min(max_s, base_s * 2 ** min(attempt, 30)) * rng.uniform(1 - jitter, 1 + jitter)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, MedlensError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:300]


class Worker:
    def __init__(self, cfg: GatewayConfig, queue: Queue, audit: AuditLog, metrics: GatewayMetrics,
                 say: Callable[[str], None] | None = None, runs: dict[str, Run] | None = None) -> None:
        self.cfg, self.queue, self.audit, self.metrics = cfg, queue, audit, metrics
        self.say = say or (lambda _line: None)
        self.runs: dict[str, Run] = dict(runs or {})
        self.rng = random.Random()
        self.results = cfg.spool / "results"
        self.drift: dict[str, tuple[Predictor, DriftMonitor]] = {}
        self.alerting: set[tuple[str, str]] = set()
        # the status page reads the drift state from the web server's thread: under this lock
        self.drift_lock = threading.Lock()
        self.drift_history: dict[str, deque] = {}  # run label -> (series seen, statistics) for the plot
        self.drift_seen: dict[str, int] = {}
        self.shadow = ShadowRecorder(queue, audit, self.say)  # shadow runs' outcomes: recorded, never sent

    # ---------------------------------------------------------------------------------------------- runs

    def run(self, path: str) -> Run:
        if path not in self.runs:
            self.runs[path] = Run.open(path)
        return self.runs[path]

    @staticmethod
    def open_runs(cfg: GatewayConfig, source=None) -> dict[str, Run]:
        """Every run the rules name, opened (a missing or broken run is a one-line error at start-up). Shadow
        runs are opened and checked too, but not returned: the serve app (STOW-RS) must not serve them."""
        runs = {str(r): Run.open(r) for rule in cfg.rules for r in rule.runs}
        check_shadows(cfg, runs, source)
        return runs

    @staticmethod
    def run_label(path: str) -> str:
        return Path(path).name

    # ---------------------------------------------------------------------------------------------- steps

    def step(self) -> None:
        for s in self.queue.due_series(self.cfg.quiet_period_s):
            self.assemble(s)
        for job in self.queue.jobs("pending"):
            self.predict(job)
        for d in self.queue.due_deliveries():
            self.deliver(d)
        self.shadow.step(self.run, lambda run, files: self._inputs(run, files, False))  # before any clean-up
        self.clean_up()
        self.metrics.depth.set(self.queue.depth())

    def assemble(self, series_uid: str) -> None:
        study, _, _ = self.queue.series_info(series_uid)
        files = self.queue.series_files(series_uid)
        try:
            feats = series_features(files)
        except Exception as e:  # an unreadable header: the series is recorded, not forced through a model
            rule, reason = None, f"unreadable instance header ({type(e).__name__})"
        else:
            rule, reason = choose_rule(self.cfg.rules, feats)
        if rule is None:
            self.queue.unroute(series_uid, reason)
            self.metrics.unrouted.inc()
            self.audit.event("unrouted", study=study, series=series_uid, reason=reason)
            self.say(f"series {self.audit.hash(series_uid)[:12]}: not routed: {reason}")
            return
        runs = [str(r) for r in rule.runs]
        self.shadow.plan(series_uid, rule, files[0] if files else None)  # before routing: kept across a crash
        self.queue.route(series_uid, rule.name, runs)
        for r in runs:
            self.metrics.routed.labels(self.run_label(r)).inc()
        self.audit.event("routed", study=study, series=series_uid, rule=rule.name,
                         runs=[self.run_label(r) for r in runs], instances=len(files))

    def _inputs(self, run: Run, files: list[str], dense: bool) -> list[Path]:
        folder = Path(files[0]).parent
        if dense or run.meta.spatial_dims == 3:
            return [folder]
        return [Path(f) for f in files]

    def predict(self, job: Job) -> None:
        study, _, _ = self.queue.series_info(job.series_uid)
        label = self.run_label(job.run)
        tag = f"series {self.audit.hash(job.series_uid)[:12]} -> {label}"
        try:
            run = self.run(job.run)
        except MedlensError as e:
            self.queue.job_closed(job.id, "failed", _one_line(e))
            self.metrics.failed.labels(label).inc()
            self.say(f"{tag}: failed: {_one_line(e)}")
            return
        model, weights = str(run.meta.model), run.weights_sha256
        files = self.queue.series_files(job.series_uid)
        dense = task_of(run).dense
        out = self.results / f"job-{job.id}"
        if out.exists():  # made before a crash, not recorded: made again (the same UIDs)
            shutil.rmtree(out)
        wants_fhir = any(d.kind == "fhir" for d in self.cfg.destinations)
        outputs = {"sr", "seg"} if dense else {"sr"}
        if wants_fhir:
            outputs.add("fhir")
        hist = self.input_histogram(job.run, run, self._inputs(run, files, dense))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inputs = self._inputs(run, files, dense)
                if dense:
                    rows, _ = segment_export(run, inputs, out, outputs)
                else:
                    rows, _ = predict_export(run, inputs, out, outputs)
                fix_result_uids(out, job.series_uid, label, weights)
        except OutOfProfile as e:
            # drift first: a job the queue shows settled has its series counted in the drift window (the status
            # page reads both; the window is in memory, so a crash in between loses nothing a restart would keep)
            self.watch_drift(job.run, run, study, job.series_uid, hist, None)
            self.shadow.record_current(job.series_uid, job.run, "refused", weights=weights)
            self.queue.job_closed(job.id, "refused", "; ".join(e.reasons), model, weights)
            self.metrics.refused.labels(label).inc()
            self.audit.event("refused", study=study, series=job.series_uid, run=label, weights_sha256=weights,
                             reasons=e.reasons)
            self.say(f"{tag}: refused (outside the training data: {'; '.join(e.reasons)}); nothing sent")
            return
        except Exception as e:  # one bad series is recorded and skipped, never fatal
            shutil.rmtree(out, ignore_errors=True)
            self.shadow.record_current(job.series_uid, job.run, "failed", weights=weights)
            self.queue.job_closed(job.id, "failed", _one_line(e), model, weights)
            self.metrics.failed.labels(label).inc()
            self.audit.event("failed", study=study, series=job.series_uid, run=label, error=_one_line(e))
            self.say(f"{tag}: failed: {_one_line(e)}")
            return
        outcome = [{"segmented": True} if isinstance(r, dict) else
                   {"prediction": r.prediction, "probability": round(float(r.probability), 6)} for r in rows]
        if not dense:  # before the job is recorded: a crash in between predicts (and records) it again
            self.shadow.record_current(job.series_uid, job.run, "predicted", run, rows, weights)
        probs = [float(r.probability) for r in rows if not isinstance(r, dict) and r.positive_class is not None]
        self.watch_drift(job.run, run, study, job.series_uid, hist, float(np.mean(probs)) if probs else None)
        self.queue.job_predicted(job.id, str(out), model, weights, [d.name for d in self.cfg.destinations])
        self.audit.event("predicted", study=study, series=job.series_uid, run=label, model=model,
                         weights_sha256=weights, outcome=outcome)

    # ---------------------------------------------------------------------------------------------- drift

    def _monitor(self, path: str, run: Run) -> tuple[Predictor, DriftMonitor]:
        if path not in self.drift:
            d = self.cfg.drift
            self.drift[path] = (Predictor(run), DriftMonitor.of_run(run, d.window, d.min_samples))
        return self.drift[path]

    def input_histogram(self, path: str, run: Run, inputs: list[Path]):
        """The mean profile histogram of a series' prepared inputs (None when it cannot be measured: drift is
        watched, never a reason for a job to fail)."""
        predictor, monitor = self._monitor(path, run)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hs = [monitor.input_histogram(predictor.prepare(predictor.load(f), str(f))) for f in inputs]
        except Exception:
            return None
        hs = [h for h in hs if h is not None]
        return np.mean(np.stack(hs), axis=0) if hs else None

    def watch_drift(self, path: str, run: Run, study: str, series: str, hist, probability: float | None) -> None:
        _, monitor = self._monitor(path, run)
        label, d = self.run_label(path), self.cfg.drift
        with self.drift_lock:
            stats = monitor.add(hist, probability)
            self.drift_seen[label] = self.drift_seen.get(label, 0) + 1
            self.drift_history.setdefault(label, deque(maxlen=DRIFT_HISTORY)).append(
                (self.drift_seen[label], dict(stats)))
        for stat, value in stats.items():
            self.metrics.drift.labels(label, stat).set(value)
            limit = d.psi_alert if stat.endswith("psi") else d.ks_alert
            key = (label, stat)
            if value > limit and key not in self.alerting:
                self.alerting.add(key)
                self.metrics.drift_alert.labels(label, stat).set(1)
                n = len(monitor.hists) if stat.startswith("input") else len(monitor.probs)
                self.audit.event("drift", run=label, stat=stat, value=round(value, 4), threshold=limit, window=n,
                                 study=study, series=series)
                self.say(f"drift alert: {label}: {stat.replace('_', ' ')} {value:.3f} > {limit:g} over the last {n} "
                         "series")
            elif value <= limit and key in self.alerting:
                self.alerting.discard(key)
                self.metrics.drift_alert.labels(label, stat).set(0)
                self.audit.event("drift_cleared", run=label, stat=stat, value=round(value, 4), threshold=limit)

    def drift_snapshot(self) -> list[dict]:
        """Per run watched so far: the latest statistics, the thresholds, which statistics are alerting, the
        window's fill, the statistics' history and the window's mean input histogram against the training one."""
        d = self.cfg.drift
        out = []
        with self.drift_lock:
            for path, (_, mon) in sorted(self.drift.items()):
                label = self.run_label(path)
                hist = self.drift_history.get(label, ())
                mean = np.mean(np.stack(list(mon.hists)), axis=0).tolist() if mon.hists else None
                out.append({"run": label, "seen": self.drift_seen.get(label, 0), "window": d.window,
                            "min_samples": d.min_samples, "inputs_in_window": len(mon.hists),
                            "outputs_in_window": len(mon.probs), "stats": dict(hist[-1][1]) if hist else {},
                            "thresholds": {"psi": d.psi_alert, "ks": d.ks_alert},
                            "alerting": sorted(s for (r, s) in list(self.alerting) if r == label),
                            "history": [(n, dict(st)) for n, st in hist],
                            "input_hist": mean,
                            "input_ref": mon.hist_ref.tolist() if mon.hist_ref is not None else None})
        return out

    # ---------------------------------------------------------------------------------------------- delivery

    def _send(self, dest: Destination, folder: Path) -> int:
        timeout = self.cfg.retry.timeout_s
        if dest.kind == "fhir":
            bundles = sorted(folder.glob("*_fhir.json"))
            for b in bundles:
                post_bundle(Bundle.model_validate_json(b.read_text(encoding="utf-8")), dest.url, timeout=timeout,
                            allow_http=self.cfg.allow_unencrypted)
            return len(bundles)
        objs = [pydicom.dcmread(f) for f in sorted(folder.glob("*_seg.dcm")) + sorted(folder.glob("*_sr.dcm"))]
        client = connect(dest.url, calling_aet=self.cfg.listen.ae_title, timeout=timeout,
                         allow_http=self.cfg.allow_unencrypted)
        return client.push(objs) if objs else 0

    def deliver(self, d: Delivery) -> None:
        study, _, _ = self.queue.series_info(d.series_uid)
        label = self.run_label(d.run)
        dest = next((x for x in self.cfg.destinations if x.name == d.destination), None)
        try:
            if dest is None:
                raise MedlensError(f"destination {d.destination} is no longer in the config")
            n = self._send(dest, Path(d.result_dir))
        except Exception as e:
            retry = self.cfg.retry
            give_up = dest is None or (retry.max_attempts is not None and d.attempts + 1 >= retry.max_attempts)
            wait = backoff(d.attempts, retry.base_s, retry.max_s, retry.jitter, self.rng)
            self.queue.record_attempt(d.job_id, d.destination, False, _one_line(e), time.time() + wait, give_up)
            self.audit.event("delivery_failed", study=study, series=d.series_uid, run=label,
                             destination=d.destination, attempt=d.attempts + 1, error=_one_line(e),
                             retry_in_s=None if give_up else round(wait, 1))
            if give_up:
                self.metrics.failed.labels(label).inc()
                self.say(f"series {self.audit.hash(d.series_uid)[:12]} -> {label}: delivery to {d.destination} "
                         f"given up after {d.attempts + 1} attempt(s): {_one_line(e)}")
            return
        if os.environ.get(EXIT_AFTER_SEND_ENV):
            os._exit(86)  # fault injection for the tests: confirmed by the destination, not yet recorded
        latency = self.queue.record_attempt(d.job_id, d.destination, True)
        self.audit.event("delivered", study=study, series=d.series_uid, run=label, destination=d.destination,
                         attempt=d.attempts + 1, objects=n)
        if latency is not None:
            self.metrics.delivered.labels(label).inc()
            self.metrics.latency.labels(label).observe(latency)
            self.say(f"series {self.audit.hash(d.series_uid)[:12]} -> {label}: delivered "
                     f"({latency:.1f} s after arrival)")

    def clean_up(self) -> None:
        for s in self.queue.close_finished_series():
            for folder in self.queue.result_dirs(s):
                shutil.rmtree(folder, ignore_errors=True)
        gone, parents = [], set()
        for sop, path in self.queue.removable_files():
            p = Path(path)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            gone.append(sop)
            parents.add(p.parent)
        if gone:
            self.queue.mark_deleted(gone)
        for folder in parents:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
