"""The gateway's change control (issue 28, deliver 5): a shadow version predicts every routed series beside the
current one, only the current one's results reach the destination (a real pynetdicom C-STORE SCP here), the
shadow's outputs are recorded in the queue file and the audit trail; ``gateway compare`` figures are checked
against values computed here from the two versions' own predictions; ``gateway promote`` rewrites the YAML,
changes the routing and is audited; a broken shadow never touches the current version's delivery.

The current version is the session's tiny trained run; the shadow, a copy of it whose convolution and linear
weights carry a little seeded noise (another weights file, a few decisions that differ)."""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import shutil
import socket
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from clirun import medlens
from gatewayhelp import xray_file
from medlens.gateway.audit import AuditLog, uid_hash
from medlens.gateway.config import load_gateway_config
from medlens.gateway.metrics import GatewayMetrics
from medlens.gateway.queue import Queue
from medlens.gateway.worker import Worker
from medlens.run import Predictor, Run

KEY_ENV, KEY = "GW_SHADOW_TEST_KEY", "shadow-test-site-key-0123456789"
NAME, PID = "Shadowperson^Ulla", "PID-SHADOW-7731"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PICK = [0, 1, 3, 8, 17, 19, 27, 30]  # PneumoniaMNIST test images: both classes, a range of probabilities


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_version(run: Path, dest: Path, noise: float = 0.03, seed: int = 0) -> Path:
    """A copy of ``run`` with seeded noise on its convolution and linear weights: another version of it."""
    dest.mkdir(parents=True)
    for f in ("run.json", "config.yaml", "model.pt"):
        shutil.copy(run / f, dest / f)
    state = torch.load(dest / "model.pt", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("weight") and v.dim() > 1:
            state[k] = v + noise * v.std() * torch.randn(v.shape, generator=g)
    torch.save(state, dest / "model.pt")
    return dest


class Destination:
    """A real DICOM C-STORE SCP (pynetdicom) keeping every dataset it receives."""

    def __init__(self) -> None:
        self.port, self.received = _free_port(), []
        ae = AE(ae_title="DEST")
        ae.supported_contexts = StoragePresentationContexts
        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event):
        self.received.append(event.dataset)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def write_config(folder: Path, current: Path, shadow: Path | None, dest_port: int, **shadow_extra) -> Path:
    rule: dict = {"name": "xr", "match": {"modality": ["DX"]}, "runs": [str(current)]}
    if shadow is not None:
        rule["shadow"] = {"run": str(shadow), **shadow_extra}
    cfg = {"listen": {"ae_title": "GW", "host": "127.0.0.1", "port": _free_port()}, "allowed_aets": ["SENDER"],
           "quiet_period_s": 0, "spool": str(folder / "spool"), "audit": str(folder / "audit.jsonl"),
           "site_key_env": KEY_ENV, "rules": [rule],
           "destinations": [{"name": "pacs", "kind": "dimse", "url": f"dimse://DEST@127.0.0.1:{dest_port}"}],
           "retry": {"base_s": 0.05, "max_s": 0.1}}
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def worker_of(config: Path) -> tuple[Worker, Queue]:
    cfg = load_gateway_config(config)
    runs = Worker.open_runs(cfg, config)
    q = Queue(cfg.queue_path)
    return Worker(cfg, q, AuditLog(cfg.audit, cfg.site_key(config)), GatewayMetrics(), runs=runs), q


def receive(q: Queue, folder: Path, pixels: np.ndarray, accession: str) -> tuple[str, str]:
    """A spooled instance recorded in the queue as the SCP would: (study, series)."""
    path, study, series, sop = xray_file(folder / generate_uid(), pixels, (NAME, PID), accession=accession)
    assert q.add_instance(sop, series, study, str(path), "SENDER", now=0.0)
    return study, series


@pytest.fixture(scope="module")
def shadowed(trained_run, data_root, tmp_path_factory):
    """Eight real X-ray studies through a gateway worker whose rule has a shadow version, one step."""
    old_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    tmp = tmp_path_factory.mktemp("shadow")
    shadow = new_version(Path(trained_run), tmp / "pneumonia_v2")
    dest = Destination()
    with np.load(data_root / "medmnist" / "pneumoniamnist.npz") as z:
        images, labels = z["test_images"][PICK], z["test_labels"][PICK].ravel().astype(int)
    config = write_config(tmp, Path(trained_run), shadow, dest.port)
    w, q = worker_of(config)
    series = [receive(q, tmp / "in", img, f"ACC{i:03d}") for i, img in enumerate(images)]
    w.step()
    w.step()  # nothing left: no second delivery, no second shadow prediction
    q.close()
    yield {"tmp": tmp, "config": config, "current": Path(trained_run), "shadow": shadow, "dest": dest,
           "images": images, "labels": labels, "series": series, "queue": tmp / "spool" / "queue.sqlite"}
    dest.stop()
    if old_key is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old_key


def own_predictions(run: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The run's positive-class probabilities and decisions for the images, computed here."""
    pred = Predictor(Run.open(run))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = np.array([float(pred.predict_arrays(pred.prepare(x)[None])[0]) for x in images])
    th = Run.open(run).meta.threshold
    assert th is not None
    return p, (p >= th.value).astype(int)


def test_the_shadow_predicts_every_series_and_nothing_of_it_is_delivered(shadowed):
    s = shadowed
    cur_hash, sh_hash = _sha256(s["current"] / "model.pt"), _sha256(s["shadow"] / "model.pt")
    assert cur_hash != sh_hash
    # exactly one result per series reached the destination, each naming the current weights, none the shadow's
    got = s["dest"].received
    assert len(got) == len(s["series"])
    for ds in got:
        text = " ".join(str(e.value) for e in ds.iterall() if isinstance(e.value, str))
        assert cur_hash in text and sh_hash not in text
    assert {str(ds.StudyInstanceUID) for ds in got} == {st for st, _ in s["series"]}
    # the shadow's outputs are in the queue file, per series, equal to the shadow run's own predictions
    p_cur, _ = own_predictions(s["current"], s["images"])
    p_sh, _ = own_predictions(s["shadow"], s["images"])
    con = sqlite3.connect(s["queue"])
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT series_uid, current_state, shadow_state, shadow_weights, current_outcome, shadow_outcome "
        "FROM shadow_outcomes")}
    jobs = con.execute("SELECT DISTINCT run FROM jobs").fetchall()
    deliveries = con.execute("SELECT count(*) FROM deliveries").fetchone()[0]
    spooled = con.execute("SELECT count(*) FROM instances WHERE deleted=0").fetchone()[0]
    con.close()
    assert jobs == [(str(s["current"]),)] and deliveries == len(s["series"])  # no job nor delivery for the shadow
    assert spooled == 0  # the series were cleaned up once both versions had predicted
    for (_, series), pc, ps in zip(s["series"], p_cur, p_sh):
        cs, ss, w, co, so = rows[series]
        assert (cs, ss, w) == ("predicted", "predicted", sh_hash)
        assert json.loads(so)["rows"][0]["p"][1] == pytest.approx(ps, abs=1e-5)
        assert json.loads(co)["rows"][0]["p"][1] == pytest.approx(pc, abs=1e-5)
    # and in the audit trail, UIDs hashed, no patient
    audit = (s["tmp"] / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    shadow_events = [e for e in events if e["event"] == "shadow_predicted"]
    assert len(shadow_events) == len(s["series"])
    assert {e["weights_sha256"] for e in shadow_events} == {sh_hash}
    assert {e["series"] for e in shadow_events} == {uid_hash(KEY.encode(), se) for _, se in s["series"]}
    assert sum(e["event"] == "delivered" for e in events) == len(s["series"])
    for secret in (NAME, PID, "ACC001", *(se for _, se in s["series"])):
        assert secret not in audit
    r = medlens("gateway", "status", s["config"])
    assert r.returncode == 0, r.stderr
    assert f"shadow pneumonia_v2 of {s['current'].name} (rule xr): predicted {len(s['series'])}" in r.stdout


def _kappa_by_hand(a: list[int], b: list[int]) -> tuple[float, float]:
    """Cohen's kappa and the Fleiss-Cohen-Everitt (1969) large-sample standard error, two classes, by hand."""
    n = len(a)
    t = [[sum(1 for x, y in zip(a, b) if (x, y) == (i, j)) / n for j in (0, 1)] for i in (0, 1)]
    r = [t[i][0] + t[i][1] for i in (0, 1)]
    c = [t[0][j] + t[1][j] for j in (0, 1)]
    po, pe = t[0][0] + t[1][1], r[0] * c[0] + r[1] * c[1]
    k = (po - pe) / (1 - pe)
    A = sum(t[i][i] * (1 - (r[i] + c[i]) * (1 - k)) ** 2 for i in (0, 1))
    B = (1 - k) ** 2 * sum(t[i][j] * (c[i] + r[j]) ** 2 for i in (0, 1) for j in (0, 1) if i != j)
    C = (k - pe * (1 - k)) ** 2
    return k, math.sqrt((A + B - C) / ((1 - pe) ** 2 * n))


def _auc_by_hand(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def test_compare_figures_match_those_computed_by_hand(shadowed):
    s = shadowed
    p_cur, d_cur = own_predictions(s["current"], s["images"])
    p_sh, d_sh = own_predictions(s["shadow"], s["images"])
    n = len(p_cur)
    agree = int((d_cur == d_sh).sum())
    kappa, se = _kappa_by_hand(list(d_cur), list(d_sh))
    # outcomes: half the studies by their UID, half by their audit-trail hash, labels as names or indices, and a
    # row for a study the gateway never saw
    csv = s["tmp"] / "outcomes.csv"
    lines = ["study,label"]
    for i, ((study, _), y) in enumerate(zip(s["series"], s["labels"])):
        ident = study if i % 2 else uid_hash(KEY.encode(), study)
        lines.append(f"{ident},{['normal', 'pneumonia'][y] if i % 3 else y}")
    lines.append("1.2.826.0.1.3680043.99.1,normal")
    csv.write_text("\n".join(lines) + "\n")
    out = s["tmp"] / "compare.json"
    r = medlens("gateway", "compare", s["config"], "--rule", "xr", "--labels", csv, "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (pair,) = res["pairs"]
    assert pair["n"] == n and pair["routed"] == n
    assert pair["current"] == s["current"].name and pair["shadow"] == "pneumonia_v2"
    assert pair["agreement"] == {"agree": agree, "percent": pytest.approx(100 * agree / n)}
    assert pair["kappa"]["kappa"] == pytest.approx(kappa, abs=1e-9)
    assert pair["kappa"]["ci_low"] == pytest.approx(max(-1, kappa - 1.959964 * se), abs=1e-5)
    assert pair["kappa"]["ci_high"] == pytest.approx(min(1, kappa + 1.959964 * se), abs=1e-5)
    assert pair["mean_abs_delta_p"] == pytest.approx(np.abs(p_cur - p_sh).mean(), abs=1e-5)
    y = s["labels"]
    lab = pair["labels"]
    assert (lab["matched"], lab["label_rows"], lab["unmatched_label_rows"]) == (n, n + 1, 1)
    assert lab["accuracy"] == {"current": pytest.approx((d_cur == y).mean()), "shadow": pytest.approx((d_sh == y).mean())}
    b, c = int(((d_cur == y) & (d_sh != y)).sum()), int(((d_cur != y) & (d_sh == y)).sum())
    p_exact = 1.0 if b + c == 0 else min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))
    assert lab["mcnemar"] == {"a_right_b_wrong": b, "a_wrong_b_right": c, "p_value": pytest.approx(p_exact)}
    assert lab["delong"]["auc_a"] == pytest.approx(_auc_by_hand(y, p_cur), abs=1e-5)
    assert lab["delong"]["auc_b"] == pytest.approx(_auc_by_hand(y, p_sh), abs=1e-5)
    assert f"agreement {100 * agree / n:.1f}% ({agree}/{n})" in r.stdout
    for secret in (NAME, PID, "ACC00", *(st for st, _ in s["series"]), *(se for _, se in s["series"])):
        assert secret not in r.stdout + r.stderr + out.read_text()


def test_promote_rewrites_the_config_changes_routing_and_is_audited(shadowed, tmp_path):
    s = shadowed
    config = write_config(tmp_path, s["current"], s["shadow"], s["dest"].port)
    before = config.read_text()
    r = medlens("gateway", "promote", config, "--rule", "xr")
    assert r.returncode == 0, r.stderr
    assert "restarted" in r.stdout
    cfg = load_gateway_config(config)
    (rule,) = cfg.rules
    assert rule.runs == [s["shadow"]] and rule.shadow is None
    (prev,) = rule.previous
    assert prev.run == s["current"] and prev.replaced_by == s["shadow"]
    assert prev.weights_sha256 == _sha256(s["current"] / "model.pt")
    (backup,) = tmp_path.glob("gateway.yaml.before-promote-*")
    assert backup.read_text() == before
    (event,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert event["event"] == "promoted" and event["rule"] == "xr" and event["by"] == getpass.getuser()
    assert event["old_weights_sha256"] == _sha256(s["current"] / "model.pt")
    assert event["new_weights_sha256"] == _sha256(s["shadow"] / "model.pt")
    # a gateway (re)started on the promoted config routes the next series to the promoted version alone
    w, q = worker_of(config)
    _, series = receive(q, tmp_path / "in", s["images"][0], "ACC-P")
    w.assemble(series)
    assert [j.run for j in q.jobs("pending")] == [str(s["shadow"])]
    assert q.db.execute("SELECT count(*) FROM shadow_outcomes").fetchone() == (0,)
    q.close()
    # nothing left to promote: one line
    r = medlens("gateway", "promote", config, "--rule", "xr")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "gateway.yaml" in r.stderr and "rule xr has no shadow run to promote" in r.stderr


def test_a_broken_shadow_never_touches_the_current_delivery(shadowed, tmp_path):
    """The shadow's folder goes away while the gateway runs: its prediction fails and is recorded; the current
    version's result is delivered all the same."""
    s = shadowed
    broken = tmp_path / "pneumonia_v3"
    shutil.copytree(s["shadow"], broken)
    w, q = worker_of(write_config(tmp_path, s["current"], broken, s["dest"].port))
    shutil.rmtree(broken)
    study, series = receive(q, tmp_path / "in", s["images"][1], "ACC-B")
    before = len(s["dest"].received)
    w.step()
    assert [str(ds.StudyInstanceUID) for ds in s["dest"].received[before:]] == [study]
    state, reason = q.db.execute("SELECT shadow_state, shadow_reason FROM shadow_outcomes WHERE series_uid=?",
                                 (series,)).fetchone()
    assert state == "failed" and "pneumonia_v3" in reason
    assert q.counts()["jobs"] == {"delivered": 1}
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert "shadow_failed" in events and "delivered" in events
    q.close()


def _one_line(r, *needles) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_shadow_configs_are_one_line(shadowed, tmp_path):
    s = shadowed
    missing = tmp_path / "no_such_run"
    config = write_config(tmp_path, s["current"], missing, s["dest"].port)
    _one_line(medlens("gateway", config), "rule xr: shadow run", "no_such_run", "run folder not found")
    _one_line(medlens("gateway", "promote", config, "--rule", "xr"), "gateway.yaml", "shadow run", "no_such_run")
    assert not (tmp_path / "audit.jsonl").exists()
    config = write_config(tmp_path, s["current"], s["shadow"], s["dest"].port, of="runs/other")
    _one_line(medlens("gateway", config), "gateway.yaml", "shadow.of runs/other is not one of its runs")
    config = write_config(tmp_path, s["current"], s["current"], s["dest"].port)
    _one_line(medlens("gateway", config), "is already one of its runs")
    _one_line(medlens("gateway", "compare", s["config"], "--rule", "nope"), "no rule named 'nope'")
    _one_line(medlens("gateway", "status", s["config"], "--rule", "xr"), "--rule is an option of gateway compare")
    bad = tmp_path / "labels.csv"
    bad.write_text("patient,label\nx,1\n")
    _one_line(medlens("gateway", "compare", s["config"], "--labels", bad), "labels.csv", "'label' column")
