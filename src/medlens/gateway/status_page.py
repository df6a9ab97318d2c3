"""The gateway's status page on its serve app (the one that answers STOW-RS, so behind the same API keys, Host
allow-list and limits): ``GET /gateway/status`` (HTML) and ``GET /gateway/status.json``.

It shows what the gateway is doing now, from the live process: jobs by state (and the series, deliveries and
spooled instances behind them), the queue depth, the recent problems with their reasons (series named only by
their audit-trail hash; anything in a reason that looks like a DICOM UID is replaced by its hash too), and per
run the rolling drift statistics (PSI and KS of the inputs and of the outputs over the window), their
thresholds and alert state, with two inline SVG plots: the statistics over the series seen, and the window's
mean input histogram against the training one. Rendered by an autoescaping Jinja template, served with a
Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import math
import re
import time

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, PackageLoader

from medlens.gateway.audit import uid_hash
from medlens.gateway.config import GatewayConfig
from medlens.gateway.queue import Queue
from medlens.gateway.worker import Worker

#: the summary line: each state and how it is counted from the queue's tables
SUMMARY = (("received", "series received (any state)"), ("routed", "jobs made by routing (series x run)"),
           ("unrouted", "series no rule matched"), ("refused", "jobs refused by the out-of-profile gate"),
           ("delivering", "jobs whose results wait for a destination"), ("done", "jobs delivered"),
           ("failed", "jobs failed (an error, or a delivery given up)"),
           ("late", "instances arrived after their series was routed"))
RECENT = 50  # problems listed on the page, the newest first (the JSON has them all)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
UID_RE = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){2,}(?![\w.])")  # 3 or more dotted numbers
STATS = ("input_psi", "input_ks", "output_psi", "output_ks")
COLOURS = {"input_psi": "#c0392b", "input_ks": "#e67e22", "output_psi": "#2c3e9f", "output_ks": "#16a085"}

_env = Environment(loader=PackageLoader("medlens.gateway", "templates"), autoescape=True)


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def redact(text: str | None, key: bytes) -> str | None:
    """A reason as shown: any DICOM-UID-looking token replaced by its audit-trail hash (12 hex digits)."""
    if text is None:
        return None

    def hashed(m: re.Match) -> str:
        tok = m.group(0)
        parts = tok.split(".")
        if len(parts) == 4 and all(len(p) <= 3 and int(p) <= 255 for p in parts):
            return tok  # an IPv4 address (a destination), not a UID
        return "uid:" + uid_hash(key, tok)[:12]

    return UID_RE.sub(hashed, str(text))


def summary(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    series, jobs, inst = counts.get("series", {}), counts.get("jobs", {}), counts.get("instances", {})
    return {"received": sum(series.values()), "routed": sum(jobs.values()), "unrouted": series.get("unrouted", 0),
            "refused": jobs.get("refused", 0), "delivering": jobs.get("delivering", 0),
            "done": jobs.get("delivered", 0), "failed": jobs.get("failed", 0), "late": inst.get("late", 0)}


def snapshot(cfg: GatewayConfig, queue: Queue, worker: Worker, key: bytes) -> dict:
    """Everything the page shows, as plain JSON-able values (no PHI: series by hash only)."""
    counts, problems, depth = queue.counts(), queue.problems(), queue.depth()
    shown = []
    for p in problems:
        q = dict(p)
        q["id"] = uid_hash(key, str(p["id"]))[:12]
        if "run" in q:
            q["run"] = Worker.run_label(str(q["run"]))
        q["reason"] = redact(q.get("reason"), key)
        q["at"] = _finite(q.get("at"))
        shown.append(q)
    drift = []
    for r in worker.drift_snapshot():
        stats = {k: _finite(v) for k, v in r["stats"].items()}
        limits = r["thresholds"]
        drift.append({**r, "stats": stats, "alert": bool(r["alerting"]),
                      "history": [(n, {k: _finite(v) for k, v in st.items()}) for n, st in r["history"]],
                      "limit_of": {s: limits["psi"] if s.endswith("psi") else limits["ks"] for s in STATS}})
    return {"time": time.time(), "summary": summary(counts), "counts": counts, "queue_depth": depth,
            "problems": shown, "drift": drift,
            "rules": [{"name": r.name, "runs": [Worker.run_label(str(p)) for p in r.runs]} for r in cfg.rules],
            "destinations": [d.name for d in cfg.destinations]}


# ------------------------------------------------------------------------------------------------ plots


def _history_plot(run: dict, w: int = 420, h: int = 150, pad: int = 30) -> dict:
    """Polylines (SVG coordinates) of each statistic over the series seen, and the threshold lines."""
    hist = run["history"]
    xmax = max([n for n, _ in hist] + [2])
    values = [v for _, st in hist for v in st.values() if v is not None]
    ymax = max(values + [run["thresholds"]["psi"] * 1.3, run["thresholds"]["ks"] * 1.3, 0.1]) * 1.05

    def xs(n: float) -> float:
        return pad + (w - 2 * pad) * (n - 1) / max(xmax - 1, 1)

    def ys(v: float) -> float:
        return h - pad - (h - 2 * pad) * v / ymax

    lines = []
    for s in STATS:
        pts = [(xs(n), ys(st[s])) for n, st in hist if st.get(s) is not None]
        if pts:
            lines.append({"stat": s, "colour": COLOURS[s],
                          "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)})
    limits = [{"name": f"{k} {v:g}", "y": round(ys(v), 1), "x": w - pad - 60 * (i + 1)}
              for i, (k, v) in enumerate(run["thresholds"].items())]
    return {"w": w, "h": h, "pad": pad, "lines": lines, "limits": limits, "ymax": round(ymax, 2), "xmax": xmax,
            "y0": h - pad, "x1": w - pad}


def _hist_plot(run: dict, w: int = 420, h: int = 150, pad: int = 30) -> dict | None:
    """Bars of the window's mean input histogram (and the training one as a line), both normalised."""
    cur, ref = run.get("input_hist"), run.get("input_ref")
    if not cur or not ref or len(cur) != len(ref):
        return None
    cs, rs = sum(cur) or 1.0, sum(ref) or 1.0
    cur, ref = [c / cs for c in cur], [r / rs for r in ref]
    top = max(cur + ref + [1e-9]) * 1.05
    bw = (w - 2 * pad) / len(cur)
    bars = [{"x": round(pad + i * bw, 1), "w": round(max(bw - 1, 0.5), 1), "y": round(h - pad - (h - 2 * pad) * c / top, 1),
             "h": round((h - 2 * pad) * c / top, 1)} for i, c in enumerate(cur)]
    ref_pts = " ".join(f"{pad + (i + 0.5) * bw:.1f},{h - pad - (h - 2 * pad) * r / top:.1f}" for i, r in enumerate(ref))
    return {"w": w, "h": h, "pad": pad, "bars": bars, "ref": ref_pts, "y0": h - pad, "x1": w - pad}


def render(snap: dict) -> str:
    runs = [{**r, "plot": _history_plot(r), "histplot": _hist_plot(r)} for r in snap["drift"]]
    problems = sorted(snap["problems"], key=lambda p: -(p.get("at") or 0.0))[:RECENT]
    return _env.get_template("status.html").render(
        s=snap, runs=runs, problems=problems, n_problems=len(snap["problems"]), summary_help=dict(SUMMARY),
        stats=STATS, colours=COLOURS, when=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"])))


def status_router(cfg: GatewayConfig, queue: Queue, worker: Worker, key: bytes) -> APIRouter:
    """``/gateway/status`` (HTML) and ``/gateway/status.json``, read from the live queue and worker."""
    router = APIRouter(tags=["gateway"])
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    async def page() -> HTMLResponse:
        snap = await run_in_threadpool(snapshot, cfg, queue, worker, key)
        return HTMLResponse(await run_in_threadpool(render, snap), headers=headers)

    async def as_json() -> JSONResponse:
        snap = await run_in_threadpool(snapshot, cfg, queue, worker, key)
        for r in snap["drift"]:
            r.pop("input_ref", None)  # the training profile itself: large and not a status
        return JSONResponse(snap, headers={"Cache-Control": "no-store"})

    router.add_api_route("/gateway/status", page, methods=["GET"], response_class=HTMLResponse,
                         summary="the gateway's status page: jobs, problems, drift")
    router.add_api_route("/gateway/status.json", as_json, methods=["GET"],
                         summary="the gateway's status: jobs by state, problems, drift (JSON)")
    return router
