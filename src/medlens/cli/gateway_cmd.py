"""``medlens gateway CONFIG`` (the clinical AI gateway: C-STORE in, results to PACS/EHR),
``medlens gateway status CONFIG`` (the queue's state), ``medlens gateway compare CONFIG`` (a shadow version
against the current one) and ``medlens gateway promote CONFIG --rule R`` (the shadow becomes current)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medlens.cli.common import console


def say(text: str) -> None:
    """One plain line on stdout, never wrapped (one line per outcome, whatever its length)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def gateway(first: str = typer.Argument(..., metavar="CONFIG|status|compare|promote",
                                        help="the gateway YAML, or 'status', 'compare' or 'promote' followed by it"),
            second: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", show_default=False,
                                                    help="after status/compare/promote: the gateway YAML"),
            rule: Optional[str] = typer.Option(None, "--rule", help="compare: only this rule's shadow; promote: "
                                               "the rule whose shadow becomes current (required)"),
            labels: Optional[Path] = typer.Option(None, "--labels", help="compare: a CSV of outcomes (label, and "
                                                  "study or accession, given or as the audit-trail hash): DeLong "
                                                  "and McNemar as in medlens compare"),
            out: Optional[Path] = typer.Option(None, "--out", help="compare: also write the figures to this JSON "
                                               "file"),
            ups: bool = typer.Option(False, "--ups", help="also serve the AIW-I UPS worklist (as a ups: section "
                                     "does)")) -> None:
    """Receive studies (DICOM C-STORE, STOW-RS), route them to runs, send the results (SR/SEG/FHIR) to PACS/EHR.

    `medlens gateway CONFIG` runs until SIGTERM or Ctrl-C and prints one line per series outcome.
    `medlens gateway status CONFIG` shows the durable queue: counts by state, unrouted/refused/failed series
    and deliveries waiting to be retried.
    `medlens gateway compare CONFIG` compares each shadow version with the current one over the series both
    predicted (agreement, Cohen's kappa, mean |delta p|; with --labels, DeLong and McNemar).
    `medlens gateway promote CONFIG --rule R` makes rule R's shadow its current version (YAML rewritten, audit
    event); a running gateway applies it when restarted."""
    from medlens.errors import ConfigError
    from medlens.gateway.config import load_gateway_config

    sub = first if first in ("status", "compare", "promote") else None
    if sub is not None:
        if second is None:
            raise ConfigError(f"gateway {sub} needs the gateway config: medlens gateway {sub} CONFIG")
    elif second is not None:
        raise ConfigError(f"unexpected argument {str(second)!r}: medlens gateway CONFIG, or medlens gateway "
                          "status|compare|promote CONFIG")
    allowed = {"--rule": ("compare", "promote"), "--labels": ("compare",), "--out": ("compare",)}
    for opt, value in (("--rule", rule), ("--labels", labels), ("--out", out)):
        if value is not None and sub not in allowed[opt]:
            raise ConfigError(f"{opt} is an option of gateway {' and '.join(allowed[opt])} only")
    if sub == "status" and second is not None:
        _status(second, load_gateway_config(second))
    elif sub == "compare" and second is not None:
        _compare(second, load_gateway_config(second), rule, labels, out)
    elif sub == "promote" and second is not None:
        if rule is None:
            raise ConfigError("gateway promote needs the rule whose shadow becomes current: --rule NAME")
        _promote(second, rule)
    else:
        cfg = load_gateway_config(first)
        if ups and cfg.ups is None:  # --ups: the worklist with no subscriber addresses (a ups: section gives them)
            from medlens.gateway.config import Ups

            cfg = cfg.model_copy(update={"ups": Ups()})
        _run(Path(first), cfg)


def _run(path: Path, cfg) -> None:
    import signal
    import threading

    from medlens.gateway.service import run_gateway

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def ready(listening) -> None:
        extra = f", metrics at {listening.metrics}" if listening.metrics else ""
        extra += f", STOW-RS at {listening.stow}" if listening.stow else ""
        say(f"gateway listening as {listening.dicom}{extra}")

    try:
        run_gateway(cfg, stop, say=say, ready=ready, source=path)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    say("gateway stopped")


def _status(path: Path, cfg) -> None:
    from medlens.gateway.service import gateway_status

    st = gateway_status(cfg, source=path)
    t = Table(title=f"gateway queue {cfg.queue_path}")
    for c in ("table", "state", "count"):
        t.add_column(c)
    for table, states in st["counts"].items():
        for state, n in states.items():
            t.add_row(table, state, str(n))
    console.print(t)
    for p in st["problems"]:
        where = f" -> {p['run']}" if "run" in p else ""
        dest = f" to {p['destination']} ({p['attempts']} attempt(s))" if "destination" in p else ""
        say(f"{p['what']} {p['id']}{where}{dest}: {p['state']}: {p['reason']}")
    from medlens.gateway.shadow import shadow_counts

    for sh in shadow_counts(cfg.queue_path):  # recorded only, never sent (gateway compare compares them)
        states = ", ".join(f"{k} {v}" for k, v in sorted(sh["states"].items()))
        say(f"shadow {sh['shadow']} of {sh['current']} (rule {sh['rule']}): {states}")


def _fmt(v, spec: str = ".3f") -> str:
    return "undefined" if v is None else format(v, spec)


def _compare(path: Path, cfg, rule: Optional[str], labels: Optional[Path], out: Optional[Path]) -> None:
    from medlens.gateway.shadow import compare_shadow
    from medlens.utils import write_json_atomic

    res = compare_shadow(cfg, rule, labels, source=path)
    ci = int(round(res["ci_level"] * 100))
    for p in res["pairs"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(p["states"].items()))
        say(f"rule {p['rule']}: shadow {p['shadow']} against current {p['current']}: {p['n']} series both predicted "
            f"of {p['routed']} routed ({states})")
        if not p["n"]:
            continue
        k, a = p["kappa"], p["agreement"]
        say(f"  agreement {a['percent']:.1f}% ({a['agree']}/{p['n']}), Cohen's kappa {_fmt(k['kappa'])} "
            f"({ci}% CI {_fmt(k['ci_low'])} to {_fmt(k['ci_high'])}), mean |delta p| {p['mean_abs_delta_p']:.4f}")
        lab = p.get("labels")
        if lab is None:
            continue
        say(f"  outcomes: {lab['matched']} compared series matched by {lab['key']} "
            f"({lab['unmatched_label_rows']} of {lab['label_rows']} label rows matched none)")
        if "accuracy" in lab:
            say(f"  accuracy: current {lab['accuracy']['current']:.4f}, shadow {lab['accuracy']['shadow']:.4f}")
        if "delong" in lab:
            d = lab["delong"]
            say(f"  DeLong: AUC {d['auc_a']:.4f} (current) vs {d['auc_b']:.4f} (shadow), difference "
                f"{d['difference']:+.4f} ({ci}% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}), p = {d['p_value']:.4g}")
        elif "delong_note" in lab:
            say(f"  DeLong: {lab['delong_note']}")
        if "mcnemar" in lab:
            m = lab["mcnemar"]
            say(f"  McNemar: {m['a_right_b_wrong']} series only the current version right, {m['a_wrong_b_right']} "
                f"only the shadow, exact p = {m['p_value']:.4g}")
        if "note" in lab:
            say(f"  {lab['note']}")
    if out is not None:
        write_json_atomic(out, res)
        say(f"figures: {out}")


def _promote(path: Path, rule: str) -> None:
    from medlens.gateway.shadow import promote

    r = promote(path, rule)
    say(f"rule {r['rule']}: {Path(r['new_run']).name} (weights {r['new_weights_sha256'][:12]}) is now the current "
        f"version in place of {Path(r['old_run']).name} (weights {r['old_weights_sha256'][:12]}), kept under "
        f"'previous:'; by {r['by']}, recorded in {r['audit']}")
    say(f"{path} rewritten (as it was: {r['backup'].name}); a running gateway applies it when restarted")
