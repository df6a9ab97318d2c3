"""``medlens compare``: a one-page HTML (and ``compare.json``) of runs compared on the same test cases."""

from __future__ import annotations

import base64
import datetime as _dt
from pathlib import Path

from jinja2 import Environment, PackageLoader

from medlens import __version__
from medlens.evaluation import plots
from medlens.evaluation.compare import compare_runs
from medlens.report.html import format_number
from medlens.utils import write_json_atomic, write_text_atomic


def write_comparison(run_dirs: list[str | Path], out: str | Path, n_boot: int = 1000, ci: float = 0.95,
                     seed: int = 0) -> dict:
    """Compare the runs (the first is the reference), write ``compare.json``, ``roc.png`` and
    ``compare.html`` into ``out``; return the comparison."""
    res = compare_runs(run_dirs, n_boot, ci, seed)
    runs = res.pop("_runs")
    out = Path(out)
    roc = None
    if res["task"] == "binary":
        roc = plots.plot_roc_overlay(runs[0].labels, {r.name: r.probs for r in runs}, out / "roc.png",
                                     f"ROC on the same {res['n']} test cases")
    write_json_atomic(out / "compare.json", res)
    env = Environment(loader=PackageLoader("medlens.report", "templates"), autoescape=True)
    env.globals["num"] = lambda v, digits=4: format_number(v, digits)
    html = env.get_template("compare.html").render(
        res=res, version=__version__, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        ci=int(round(ci * 100)), roc=base64.b64encode(roc.read_bytes()).decode("ascii") if roc else None)
    write_text_atomic(out / "compare.html", html)
    return res
