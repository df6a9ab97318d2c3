"""Change control (issue 28): a new version of a model in shadow mode, its comparison with the current version, and
its promotion.

- **Shadow mode.** A routing rule may name ``shadow: {run: NEW, of: CURRENT}``. Every series the rule takes is
  predicted by both versions; only the current one's results are built and delivered. The shadow predicts in
  memory, behind the same out-of-profile gate, after the step's deliveries: it writes no SR/SEG/FHIR, has no
  delivery row, and is not served by the STOW-RS app, so nothing of it can leave. Its outputs (each prediction's
  label and class probabilities), and the current version's for the same series, are kept in the table
  ``shadow_outcomes`` of the queue's SQLite file (created here, idempotently) and in the audit trail
  (``shadow_predicted`` / ``shadow_refused`` / ``shadow_failed``). Any error of the shadow is recorded and
  never reaches the current version's job.
- **Compare** (``medlens gateway compare``): over the series both versions predicted, the percent agreement of
  the decisions, Cohen's kappa with its 95% CI (the large-sample variance of Fleiss, Cohen & Everitt 1969) and
  the mean |delta p|. With a CSV of outcomes, keyed by StudyInstanceUID or AccessionNumber (given, or as its
  audit-trail hash), the paired DeLong and McNemar tests of ``evaluation.compare`` (as ``medlens compare``).
- **Promote** (``medlens gateway promote``): the shadow becomes the current version in the YAML (rewritten
  atomically; the replaced version kept under the rule's ``previous:`` with its weights hash, and the file as it
  was kept beside it), recorded in the audit trail. A running gateway applies it when restarted.

One series gives one answer per version: its one prediction (a single image, or a volume), or, for a series of
several images predicted one by one, the image with the highest probability of the positive class (binary) or of
its predicted class (multi-class), the usual study-level aggregation.
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydantic import ValidationError
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from medlens.errors import ConfigError, DataError, MedlensError
from medlens.evaluation.compare import delong_test, mcnemar_test
from medlens.gateway.audit import AuditLog, uid_hash
from medlens.gateway.config import GatewayConfig, Rule, load_gateway_config
from medlens.gateway.queue import Queue
from medlens.run import Predictor, Run
from medlens.safe_yaml import safe_load_yaml
from medlens.utils import write_text_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_outcomes (
    series_uid TEXT NOT NULL, rule TEXT NOT NULL, current_run TEXT NOT NULL, shadow_run TEXT NOT NULL,
    accession_hash TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    current_state TEXT NOT NULL DEFAULT 'pending', current_weights TEXT, current_outcome TEXT,
    shadow_state TEXT NOT NULL DEFAULT 'pending', shadow_weights TEXT, shadow_outcome TEXT, shadow_reason TEXT,
    PRIMARY KEY(series_uid, shadow_run));
"""
_HASH = re.compile(r"[0-9a-f]{32}")


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, MedlensError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:300]


def label(path: str | Path) -> str:
    return Path(path).name


# ---------------------------------------------------------------------------------------------- start-up checks


def comparable(current: Run, shadow: Run) -> str | None:
    """Why ``shadow`` cannot shadow ``current`` (None when it can): both classifiers of one exclusive-class task
    with the same classes."""
    task = shadow.task_type
    if task.dense or task.numeric or not task.exclusive:
        return f"shadow mode compares classifiers of exclusive classes, not {task.title}"
    if not current.task_type.same_outputs(current.meta.class_names, shadow.task, shadow.meta.class_names):
        return (f"not a version of the same model ({current.task} {list(current.meta.class_names)} against "
                f"{shadow.task} {list(shadow.meta.class_names)})")
    return None


def check_shadows(cfg: GatewayConfig, runs: dict[str, Run], source=None) -> None:
    """Open every shadow run and check it against the run it shadows: a missing, broken or different one is a
    one-line ``ConfigError`` naming the config and the rule."""
    for rule in cfg.rules:
        if rule.shadow is None or rule.shadowed is None:
            continue
        try:
            shadow = Run.open(rule.shadow.run)
        except MedlensError as e:
            raise ConfigError(f"rule {rule.name}: shadow run: {e}", source) from None
        current = runs.get(str(rule.shadowed)) or Run.open(rule.shadowed)
        why = comparable(current, shadow)
        if why is not None:
            raise ConfigError(f"rule {rule.name}: shadow run {rule.shadow.run}: {why}", source)


# ---------------------------------------------------------------------------------------------- recording


def outcome(run: Run, rows) -> dict:
    """What is kept of a version's answer for a series: the classes, each prediction's label and probabilities,
    and the index of the positive class (binary) or None."""
    names = [str(c) for c in run.meta.class_names]
    positive = None
    if rows and getattr(rows[0], "positive_class", None) in names:
        positive = names.index(rows[0].positive_class)
    return {"classes": names, "positive": positive,
            "rows": [{"prediction": str(r.prediction), "p": [round(float(r.probabilities[c]), 6) for c in names]}
                     for r in rows]}


class ShadowRecorder:
    """The shadow table beside the queue's (same file, same connection and lock) and the shadow predictions."""

    def __init__(self, queue: Queue, audit: AuditLog, say: Callable[[str], None] | None = None) -> None:
        self.queue, self.audit = queue, audit
        self.say = say or (lambda _line: None)
        self.predictors: dict[str, Predictor] = {}
        with queue.lock:
            queue.db.executescript(SCHEMA)

    def plan(self, series_uid: str, rule: Rule, first_file: str | None) -> None:
        """Before the series is routed: one row per shadow of its rule (idempotent: a series routed again after a
        crash keeps its row). The AccessionNumber is kept only as its audit-trail hash (to match outcomes)."""
        if rule.shadow is None or rule.shadowed is None:
            return
        acc = None
        if first_file is not None:
            try:
                value = str(pydicom.dcmread(first_file, stop_before_pixels=True).get("AccessionNumber", "")).strip()
            except Exception:  # an unreadable header: no accession to match outcomes by
                value = ""
            acc = self.audit.hash(value) if value else None
        now = time.time()
        with self.queue.tx() as db:
            db.execute("INSERT OR IGNORE INTO shadow_outcomes(series_uid, rule, current_run, shadow_run, "
                       "accession_hash, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                       (series_uid, rule.name, str(rule.shadowed), str(rule.shadow.run), acc, now, now))

    def record_current(self, series_uid: str, run_path: str, state: str, run: Run | None = None, rows=None,
                       weights: str | None = None) -> None:
        """The current version's answer for a series it shadows (nothing when no shadow watches it)."""
        text = json.dumps(outcome(run, rows)) if run is not None and rows is not None else None
        with self.queue.tx() as db:
            db.execute("UPDATE shadow_outcomes SET current_state=?, current_weights=?, current_outcome=?, updated_at=? "
                       "WHERE series_uid=? AND current_run=?", (state, weights, text, time.time(), series_uid, run_path))

    def pending(self) -> list[tuple[str, str, str, str]]:
        with self.queue.lock:
            return [tuple(r) for r in self.queue.db.execute(
                "SELECT series_uid, rule, current_run, shadow_run FROM shadow_outcomes WHERE shadow_state='pending' "
                "ORDER BY created_at").fetchall()]

    def _close(self, series_uid: str, shadow_run: str, state: str, weights: str | None, text: str | None,
               reason: str | None) -> None:
        with self.queue.tx() as db:
            db.execute("UPDATE shadow_outcomes SET shadow_state=?, shadow_weights=?, shadow_outcome=?, shadow_reason=?, "
                       "updated_at=? WHERE series_uid=? AND shadow_run=?",
                       (state, weights, text, reason, time.time(), series_uid, shadow_run))

    def step(self, open_run: Callable[[str], Run], inputs: Callable[[Run, list[str]], list[Path]]) -> None:
        """Predict every pending shadow: recorded as 'predicted', 'refused' (outside the training profile, with
        the reasons) or 'failed' (the error); nothing is written for delivery."""
        for series_uid, rule, current, shadow in self.pending():
            try:
                self.predict(series_uid, rule, current, shadow, open_run, inputs)
            except Exception as e:  # the shadow never stops the gateway
                self._close(series_uid, shadow, "failed", None, None, _one_line(e))

    def predict(self, series_uid: str, rule: str, current: str, shadow: str, open_run: Callable[[str], Run],
                inputs: Callable[[Run, list[str]], list[Path]]) -> None:
        study, _, _ = self.queue.series_info(series_uid)
        tag = f"series {self.audit.hash(series_uid)[:12]} -> shadow {label(shadow)} (of {label(current)})"
        weights = None
        try:
            run = open_run(shadow)
            weights = run.weights_sha256
            files = self.queue.series_files(series_uid)
            if not files:
                raise DataError("the series' files are no longer in the spool")
            if shadow not in self.predictors:
                self.predictors[shadow] = Predictor(run)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = self.predictors[shadow].predict_files([str(f) for f in inputs(run, files)])
        except Exception as e:
            self._close(series_uid, shadow, "failed", weights, None, _one_line(e))
            self.audit.event("shadow_failed", study=study, series=series_uid, rule=rule, run=label(shadow),
                             shadow_of=label(current), error=_one_line(e))
            self.say(f"{tag}: failed: {_one_line(e)} (the current version is not affected)")
            return
        reasons = sorted({w for r in rows for w in r.extra.get("input_warnings") or []})
        if reasons:  # the gate the current version passes through before anything is sent
            self._close(series_uid, shadow, "refused", weights, None, "; ".join(reasons))
            self.audit.event("shadow_refused", study=study, series=series_uid, rule=rule, run=label(shadow),
                             shadow_of=label(current), weights_sha256=weights, reasons=reasons)
            self.say(f"{tag}: refused (outside the training data: {'; '.join(reasons)}); recorded")
            return
        out = outcome(run, rows)
        self._close(series_uid, shadow, "predicted", weights, json.dumps(out), None)
        self.audit.event("shadow_predicted", study=study, series=series_uid, rule=rule, run=label(shadow),
                         shadow_of=label(current), weights_sha256=weights,
                         outcome=[{"prediction": r["prediction"], "probabilities": dict(zip(out["classes"], r["p"]))}
                                  for r in out["rows"]])
        ans = series_answer(out)
        self.say(f"{tag}: {out['classes'][ans[0]]} (p {max(ans[1]):.3f}); recorded, not sent")


# ---------------------------------------------------------------------------------------------- compare


def series_answer(out: dict) -> tuple[int, np.ndarray]:
    """One series' decision (class index) and class probabilities from a recorded outcome, validated."""
    classes, rows, pos = out.get("classes"), out.get("rows"), out.get("positive")
    if not isinstance(classes, list) or len(classes) < 2 or not isinstance(rows, list) or not rows:
        raise DataError("a recorded shadow outcome has no classes or no predictions")
    probs, labels = [], []
    for r in rows:
        p = np.asarray(r.get("p"), dtype=np.float64) if isinstance(r, dict) else np.empty(0)
        if p.shape != (len(classes),) or not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise DataError("a recorded shadow outcome holds probabilities that are not in [0, 1] per class")
        if r.get("prediction") not in classes:
            raise DataError("a recorded shadow outcome names a class the run does not have")
        probs.append(p)
        labels.append(classes.index(r["prediction"]))
    if isinstance(pos, int) and 0 <= pos < len(classes):
        i = int(np.argmax([p[pos] for p in probs]))
    else:
        i = int(np.argmax([p[k] for p, k in zip(probs, labels)]))
    return labels[i], probs[i]


def kappa_with_ci(a: np.ndarray, b: np.ndarray, k: int, level: float = 0.95) -> dict:
    """Cohen's kappa of two raters' class indices (scikit-learn) and its normal-theory CI from the large-sample
    variance of Fleiss, Cohen & Everitt (1969); kappa is undefined (None) when both always give one class."""
    n = len(a)
    table = np.zeros((k, k))
    np.add.at(table, (a, b), 1)
    p = table / n
    rows, cols = p.sum(1), p.sum(0)
    pe = float(rows @ cols)
    if n == 0 or pe >= 1:
        return {"kappa": None, "ci_low": None, "ci_high": None, "se": None}
    kappa = float(cohen_kappa_score(a, b, labels=list(range(k))))
    term_a = float((np.diag(p) * (1 - (rows + cols) * (1 - kappa)) ** 2).sum())
    off = p * (cols[:, None] + rows[None, :]) ** 2
    np.fill_diagonal(off, 0)
    term_b = (1 - kappa) ** 2 * float(off.sum())
    term_c = (kappa - pe * (1 - kappa)) ** 2
    se = float(np.sqrt(max(term_a + term_b - term_c, 0.0) / ((1 - pe) ** 2 * n)))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return {"kappa": kappa, "se": se, "ci_low": max(-1.0, kappa - z * se), "ci_high": min(1.0, kappa + z * se)}


@dataclass
class Pair:
    rule: str
    current: str
    shadow: str
    routed: int
    states: dict[str, int]
    current_weights: list[str]
    shadow_weights: list[str]
    series: list[str]           # both predicted, in order
    studies: list[str]
    accessions: list[str | None]
    classes: list[str]
    positive: int | None
    a_label: np.ndarray         # current
    b_label: np.ndarray         # shadow
    a_p: np.ndarray             # (n, k)
    b_p: np.ndarray


def load_pairs(queue_path: Path, rule: str | None = None) -> list[Pair]:
    """The recorded (current, shadow) pairs of the queue file, each over the series both predicted."""
    q = Queue(queue_path, readonly=True)
    try:
        with q.lock:
            if not q.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='shadow_outcomes'").fetchall():
                raise DataError("no shadow predictions recorded in this queue (does a rule name a shadow run, and has "
                                "the gateway run since?)", queue_path)
            rows = q.db.execute(
                "SELECT o.rule, o.current_run, o.shadow_run, o.series_uid, s.study_uid, o.accession_hash, "
                "o.current_state, o.current_weights, o.current_outcome, o.shadow_state, o.shadow_weights, "
                "o.shadow_outcome FROM shadow_outcomes o JOIN series s ON s.series_uid=o.series_uid "
                "ORDER BY o.created_at, o.series_uid").fetchall()
    finally:
        q.close()
    groups: dict[tuple[str, str, str], list[tuple]] = {}
    for r in rows:
        if rule is None or r[0] == rule:
            groups.setdefault((r[0], r[1], r[2]), []).append(r)
    if not groups:
        raise DataError(f"no shadow predictions recorded{f' for rule {rule}' if rule else ''}", queue_path)
    pairs = []
    for (rname, cur, sh), rs in groups.items():
        states: dict[str, int] = {}
        for r in rs:
            for who, st in (("current", r[6]), ("shadow", r[9])):
                states[f"{who} {st}"] = states.get(f"{who} {st}", 0) + 1
        both = [r for r in rs if r[6] == "predicted" and r[9] == "predicted"]
        answers, classes, positive = [], [], None
        for r in both:
            try:
                a, b = json.loads(r[8]), json.loads(r[11])
            except (TypeError, json.JSONDecodeError):
                raise DataError("a recorded shadow outcome is not JSON", queue_path) from None
            if not isinstance(a, dict) or not isinstance(b, dict) or a.get("classes") != b.get("classes"):
                raise DataError(f"rule {rname}: the versions' recorded classes differ", queue_path)
            classes, positive = list(a["classes"]), a.get("positive")
            answers.append((series_answer(a), series_answer(b)))
        k = max(len(classes), 2)
        pairs.append(Pair(
            rname, cur, sh, len(rs), states, sorted({r[7] for r in rs if r[7]}), sorted({r[10] for r in rs if r[10]}),
            [r[3] for r in both], [r[4] for r in both], [r[5] for r in both], classes,
            positive if isinstance(positive, int) else None,
            np.array([x[0][0] for x in answers], dtype=int), np.array([x[1][0] for x in answers], dtype=int),
            np.array([x[0][1] for x in answers]).reshape(-1, k), np.array([x[1][1] for x in answers]).reshape(-1, k)))
    return pairs


def shadow_counts(queue_path: Path) -> list[dict]:
    """Per recorded (rule, current, shadow) pair: how many series each version answered, by state (for
    ``gateway status``); empty when no shadow was ever recorded."""
    q = Queue(queue_path, readonly=True)
    try:
        with q.lock:
            if not q.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='shadow_outcomes'").fetchall():
                return []
            rows = q.db.execute("SELECT rule, current_run, shadow_run, shadow_state, count(*) FROM shadow_outcomes "
                                "GROUP BY rule, current_run, shadow_run, shadow_state ORDER BY rule, shadow_run").fetchall()
    finally:
        q.close()
    out: dict[tuple[str, str, str], dict[str, int]] = {}
    for rule, cur, sh, state, n in rows:
        out.setdefault((rule, cur, sh), {})[state] = int(n)
    return [{"rule": r, "current": label(c), "shadow": label(sh), "states": st} for (r, c, sh), st in out.items()]


def read_outcomes(path: Path, key: bytes, classes_of: Callable[[], list[str]]) -> tuple[dict[str, str], str]:
    """A CSV of outcomes: a ``study`` (StudyInstanceUID) or ``accession`` (AccessionNumber) column, given or as
    its audit-trail hash (32 hex characters), and a ``label`` column (a class name or index). Returns
    {hash: label as given} and which key it was."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the outcomes CSV ({type(e).__name__})", path) from None
    keys = [c for c in ("study", "accession") if c in fields]
    if "label" not in fields or len(keys) != 1:
        raise DataError("the outcomes CSV needs a 'label' column and one of 'study' (StudyInstanceUID) or "
                        "'accession' (AccessionNumber), given or as their audit-trail hash", path)
    kcol = keys[0]
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        ident, lab = row.get(kcol, ""), row.get("label", "")
        if not ident or not lab:
            raise DataError(f"line {i}: an empty {kcol} or label", path)
        h = ident.lower() if _HASH.fullmatch(ident.lower()) else uid_hash(key, ident)
        if h in out and out[h] != lab:
            raise DataError(f"line {i}: the same {kcol} (hash {h[:12]}) has two different labels", path)
        out[h] = lab
    if not out:
        raise DataError("the outcomes CSV has no rows", path)
    classes = classes_of()
    for lab in out.values():
        if lab not in classes and not (lab.isdigit() and int(lab) < len(classes)):
            raise DataError(f"label {lab[:40]!r} is neither a class ({', '.join(classes)}) nor a class index", path)
    return out, kcol


def compare_shadow(cfg: GatewayConfig, rule: str | None = None, labels: Path | None = None, source=None,
                   level: float = 0.95) -> dict:
    """Agreement of each recorded (current, shadow) pair over the series both predicted; with ``labels``, the
    paired DeLong (binary) and McNemar tests of ``evaluation.compare`` against the outcomes."""
    if rule is not None and rule not in {r.name for r in cfg.rules}:
        raise ConfigError(f"no rule named {rule!r} (rules: {', '.join(r.name for r in cfg.rules)})", source)
    pairs = load_pairs(cfg.queue_path, rule)
    key = cfg.site_key(source) if labels is not None else b""
    result: dict = {"ci_level": level, "pairs": []}
    for pr in pairs:
        n = len(pr.series)
        d: dict = {"rule": pr.rule, "current": label(pr.current), "shadow": label(pr.shadow), "routed": pr.routed,
                   "states": pr.states, "current_weights_sha256": pr.current_weights,
                   "shadow_weights_sha256": pr.shadow_weights, "n": n, "classes": pr.classes}
        if n:
            agree = int((pr.a_label == pr.b_label).sum())
            d["agreement"] = {"agree": agree, "percent": 100.0 * agree / n}
            d["kappa"] = kappa_with_ci(pr.a_label, pr.b_label, len(pr.classes), level)
            d["mean_abs_delta_p"] = float(np.abs(pr.a_p - pr.b_p).max(axis=1).mean())
        if labels is not None:
            d["labels"] = _against_outcomes(pr, labels, key, level)
        result["pairs"].append(d)
    return result


def _against_outcomes(pr: Pair, path: Path, key: bytes, level: float) -> dict:
    table, kcol = read_outcomes(path, key, lambda: pr.classes)
    ids = [uid_hash(key, s) for s in pr.studies] if kcol == "study" else [a or "" for a in pr.accessions]
    idx = [i for i, h in enumerate(ids) if h in table]
    out: dict = {"key": kcol, "matched": len(idx), "label_rows": len(table),
                 "unmatched_label_rows": len(set(table) - {ids[i] for i in idx})}
    if not idx:
        out["note"] = "no compared series has an outcome in the CSV"
        return out
    y = np.array([pr.classes.index(v) if v in pr.classes else int(v) for v in (table[ids[i]] for i in idx)])
    a, b = pr.a_label[idx], pr.b_label[idx]
    out["accuracy"] = {"current": float((a == y).mean()), "shadow": float((b == y).mean())}
    out["mcnemar"] = mcnemar_test(a == y, b == y)  # A = the current version, B = the shadow
    if pr.positive is not None and len(pr.classes) == 2:
        yb = (y == pr.positive).astype(int)
        if 0 < yb.sum() < len(yb):
            out["delong"] = delong_test(yb, pr.a_p[idx, pr.positive], pr.b_p[idx, pr.positive], level)
        else:
            out["delong_note"] = "DeLong needs both outcomes among the matched series"
    return out


# ---------------------------------------------------------------------------------------------- promote


def promote(path: Path, rule_name: str, who: str | None = None) -> dict:
    """Make the shadow of ``rule_name`` its current version: the YAML rewritten atomically (the replaced version
    under the rule's ``previous:``; the file as it was kept as ``<config>.before-promote-<UTC time>``, comments
    included), then the ``promoted`` audit event (who, when, old and new run and weights hash)."""
    path = Path(path)
    cfg = load_gateway_config(path)
    rule = next((r for r in cfg.rules if r.name == rule_name), None)
    if rule is None:
        raise ConfigError(f"no rule named {rule_name!r} (rules: {', '.join(r.name for r in cfg.rules)})", path)
    if rule.shadow is None or rule.shadowed is None:
        raise ConfigError(f"rule {rule_name} has no shadow run to promote", path)
    key = cfg.site_key(path)
    try:
        old = Run.open(rule.shadowed)
    except MedlensError as e:
        raise ConfigError(f"rule {rule_name}: current run: {e}", path) from None
    check_shadows(cfg.model_copy(update={"rules": [rule]}), {str(rule.shadowed): old}, path)
    new = Run.open(rule.shadow.run)
    text = path.read_text(encoding="utf-8")
    raw = safe_load_yaml(text, path)
    (raw_rule,) = [r for r in raw["rules"] if isinstance(r, dict) and r.get("name") == rule_name]
    sh = raw_rule.pop("shadow")
    of = sh.get("of") or raw_rule["runs"][0]
    (i,) = [j for j, r in enumerate(raw_rule["runs"]) if Path(str(r)) == Path(str(of))]
    when = dt.datetime.now(dt.timezone.utc)
    raw_rule["runs"][i] = sh["run"]
    raw_rule.setdefault("previous", []).append(
        {"run": str(of), "weights_sha256": old.weights_sha256, "replaced_by": str(sh["run"]),
         "replaced_at": when.isoformat(timespec="seconds")})
    try:
        GatewayConfig.model_validate(raw)
    except ValidationError as e:  # pragma: no cover  (a promoted config that would not load is never written)
        raise ConfigError(f"the promoted config would not be valid ({e.errors()[0]['msg']})", path) from None
    backup = path.with_name(f"{path.name}.before-promote-{when.strftime('%Y%m%dT%H%M%SZ')}")
    write_text_atomic(backup, text)
    write_text_atomic(path, yaml.safe_dump(raw, sort_keys=False, allow_unicode=False, width=120))
    who = who or _user()
    AuditLog(cfg.audit, key).event("promoted", rule=rule_name, by=who, config=str(path.resolve()),
                                   old_run=label(rule.shadowed), old_weights_sha256=old.weights_sha256,
                                   new_run=label(rule.shadow.run), new_weights_sha256=new.weights_sha256,
                                   kept_as=backup.name)
    return {"rule": rule_name, "by": who, "old_run": str(rule.shadowed), "old_weights_sha256": old.weights_sha256,
            "new_run": str(rule.shadow.run), "new_weights_sha256": new.weights_sha256, "backup": backup,
            "audit": cfg.audit}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment
        return "unknown"
