"""``medlens train|evaluate|recalibrate|compare|report``: the run-folder lifecycle."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, print_plan, progress_step, quiet_libraries, say

if TYPE_CHECKING:  # types only: nothing is imported at run time
    from medlens.config import ExperimentConfig


def _metrics_table(results: dict[str, Any], split: str, title: str | None = None) -> Table:
    from medlens.report.html import PRETTY

    unit = f" ({results['distance_unit']})" if "distance_unit" in results else ""
    t = Table(title=title or f"{results.get('dataset')} - {split} (n={results[split]['n']}), 95% bootstrap CI")
    for col in ("metric", "value", "95% CI"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    metrics: dict[str, dict[str, float]] = results[split]["metrics"]
    for k, v in metrics.items():
        name = PRETTY.get(k, k)
        t.add_row(name + (unit if k in ("hd95", "msd") else ""), f"{v['value']:.3f}",
                  f"{v['ci_low']:.3f} - {v['ci_high']:.3f}")
    return t


def _print_clinical(results: dict[str, Any], split: str) -> None:
    """Calibration before/after scaling and any validation-to-test drift, in plain words."""
    cal = results.get("calibration")
    if cal and cal.get(split):
        c = cal[split]
        line = f"calibration ({split}): ECE {c['before']['ece']['value']:.3f} uncalibrated"
        if "after" in c:
            on = "the site sample" if cal.get("fitted_on") == "site" else "validation"
            line += f", {c['after']['ece']['value']:.3f} after {cal['method']} scaling (fitted on {on})"
        say(line)
        if "after" in c and c["after"]["ece"]["value"] > c["before"]["ece"]["value"]:
            console.print(f"warning: {cal['method']} scaling made the {split} probabilities worse calibrated "
                          f"(ECE {c['before']['ece']['value']:.3f} -> {c['after']['ece']['value']:.3f})",
                          style="yellow", markup=False, highlight=False)
    for flag in results.get("shift", {}).get("flags", []):
        console.print(f"warning: {flag}", style="yellow", markup=False, highlight=False)


def _print_results(run: Path) -> None:
    """The test metrics of a finished run: table, second observer, calibration and drift."""
    results = json.loads((run / "metrics.json").read_text())
    console.print(_metrics_table(results, "test"))
    if "reference_observer" in results:
        console.print(_metrics_table({**results, "ref": results["reference_observer"]}, "ref",
                                     "second observer against the same reference (human level)"))
    _print_clinical(results, "test")


def _auto_plan(source: Path, budget: str | None, seed: int, sets: list[str], run_dir: Path | None,
               started: float) -> ExperimentConfig:
    """``train --auto``: the plan of ``source`` (its clock started at ``started``), written beside the run
    folder."""
    from medlens.errors import ConfigError
    from medlens.workflow.plan import make_plan, write_plan
    from medlens.workflow.train import resolve_run_dir

    if budget is None:
        raise ConfigError("--auto needs --budget (e.g. --budget 15m): the plan is fitted to it")
    cfg = make_plan(str(source), budget, seed=seed, overrides=sets, started=started, log=say)
    run = resolve_run_dir(cfg, run_dir)
    out = write_plan(cfg, run.parent / f"{run.name}.plan.yaml")
    print_plan(cfg, out)
    return cfg


def _loading_bar(stack: ExitStack) -> Callable[[int, int, str], None]:
    """``train``'s loading bar (``progress_step``), closed once the data are in memory ("loaded"): the fit then
    shows Lightning's own bar."""
    report = stack.enter_context(progress_step("loading the data"))

    def loading(done: int, total: int, what: str) -> None:
        if what == "loaded":
            stack.close()
        else:
            report(done, total)

    return loading


def train(config: Path = typer.Argument(..., help="experiment YAML (with --auto: the data, as `medlens plan` "
                                        "takes it)"),
          auto: bool = typer.Option(False, "--auto", help="plan (medlens plan) and train in one go within "
                                    "--budget"),
          budget: Optional[str] = typer.Option(None, "--budget", help="with --auto: wall time of the whole "
                                               "command, e.g. 15m"),
          seed: Optional[int] = typer.Option(None, "--seed", help="with --auto: the plan's seed (default 0)"),
          resume: bool = typer.Option(False, "--resume", help="continue from checkpoints/last.ckpt"),
          overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="default: <output_dir>/<name>"),
          set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. train.epochs=5"),
          quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
          devices: Optional[int] = typer.Option(None, "--devices", help="data-parallel processes per node "
                                                "(train.devices)"),
          num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="nodes (train.num_nodes; started "
                                                  "by torchrun or srun, docs/distributed.md)"),
          strategy: Optional[str] = typer.Option(None, "--strategy", help="auto, single or ddp (train.strategy)"),
          dry_run: bool = typer.Option(False, "--dry-run", help="check the config and print the distributed "
                                       "layout this process would join; train nothing")) -> None:
    """Train, evaluate on the test split and write the report of one experiment."""
    started = time.monotonic()  # --auto: loading the training chain is part of the budget
    from medlens.config import load_config
    from medlens.engine.distributed import global_rank, plan
    from medlens.errors import ConfigError
    from medlens.run import Run
    from medlens.workflow.train import train as do_train

    quiet_libraries()
    extra = [f"train.{k}={v}" for k, v in (("devices", devices), ("num_nodes", num_nodes),
                                           ("strategy", strategy)) if v is not None]
    if auto:
        cfg = _auto_plan(config, budget, seed or 0, list(set_) + extra, run_dir, started)
    else:
        if budget is not None or seed is not None:
            raise ConfigError("--budget and --seed are for --auto (plan and train); a config sets its own "
                              "seed and time limit (seed, train.max_minutes)")
        cfg = load_config(config, list(set_) + extra)
    if dry_run:
        p = plan(cfg.train)
        say(json.dumps({"config": str(config), "rank": p.rank, **p.summary()}))
        return
    with ExitStack() as bars:
        run = do_train(cfg, run_dir=run_dir, resume=resume, overwrite=overwrite, progress_bar=not quiet, log=say,
                       progress=None if quiet or global_rank() != 0 else _loading_bar(bars))
    if global_rank() != 0:  # data parallel under torchrun/srun: rank 0 reports
        return
    _print_results(run)
    meta = Run.open(run).meta
    if meta.threshold is not None:
        say(f"threshold {meta.threshold.value:.4f} ({meta.threshold.rule}, chosen on validation)")
    console.print(f"trained in {meta.train_seconds} s; report: [bold]{run / 'report.html'}[/]")
    if auto and cfg.plan:   # issue 30 item 3: the plan's estimate against reality
        say(f"wall time {time.monotonic() - started:.0f} s after the interpreter's start, planned "
            f"{cfg.plan['estimates']['total_s']:.0f} s + 10 s of start-up (budget {cfg.plan['budget']})")


def evaluate(run_dir: Path = typer.Argument(..., help="a run folder"),
             split: str = typer.Option("test", "--split", help="test or val")) -> None:
    """Re-evaluate a trained run on a split (threshold always from validation)."""
    from medlens.errors import MedlensError
    from medlens.evaluation.evaluate import evaluate_run
    from medlens.report.html import write_report
    from medlens.run import Run
    from medlens.tasks import get_task

    if split not in ("test", "val"):
        raise MedlensError(f"--split must be test or val, not '{split}'")
    quiet_libraries()
    run = Run.open(run_dir)
    run.require_weights()
    if get_task(run.task).dense:
        from medlens.evaluation.segmentation import evaluate_segmentation_run

        with progress_step("evaluating") as report:
            results = evaluate_segmentation_run(run, split=split, progress=report)
    else:
        with progress_step("evaluating") as report:
            results = evaluate_run(run, split=split, progress=report)
    write_report(run)
    console.print(_metrics_table(results, split))
    _print_clinical(results, split)


def recalibrate(run_dir: Path = typer.Argument(..., help="a trained classifier run"),
                on: Path = typer.Option(..., "--on", help="the site's labelled sample: a CSV manifest "
                                                           "path,label[,patient_id], paths relative to it"),
                out: Path = typer.Option(..., "--out", help="the new run folder (the original is not changed)"),
                overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder")) -> None:
    """Refit calibration and threshold on a site's own labelled sample, into a new run folder."""
    from medlens.run import Run
    from medlens.workflow.recalibrate import recalibrate as do_recalibrate

    quiet_libraries()
    new = do_recalibrate(run_dir, on, out, overwrite)
    meta = Run.open(new).meta
    if meta.threshold is not None:
        n = (meta.recalibrated_on or {}).get("n")
        say(f"threshold {meta.threshold.value:.4f} ({meta.threshold.rule}, chosen on the site sample of {n} cases)")
    results = json.loads((new / "metrics.json").read_text())
    console.print(_metrics_table(results, "test"))
    _print_clinical(results, "test")
    console.print(f"recalibrated run: [bold]{new}[/]")


def compare(runs: List[Path] = typer.Argument(..., help="two or more run folders; the first is the reference"),
            out: Path = typer.Option(Path("comparison"), "--out", help="folder for compare.json, compare.html "
                                                                         "and the ROC plot"),
            bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples of the differences"),
            seed: int = typer.Option(0, "--seed")) -> None:
    """Compare runs on the same test cases: paired DeLong, McNemar, bootstrap CIs of differences."""
    from medlens.report.compare import write_comparison

    quiet_libraries()
    run_dirs: list[str | Path] = list(runs)
    res = write_comparison(run_dirs, out, n_boot=bootstrap, seed=seed)
    ci = int(round(res["ci_level"] * 100))
    for pair in res["pairs"]:
        t = Table(title=f"{pair['a']} - {pair['b']} on the same {res['n']} test cases ({ci}% CIs)")
        for col in ("metric", "A - B", f"{ci}% CI"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for k, v in pair["differences"].items():
            t.add_row(k, f"{v['value']:+.4f}", f"{v['ci_low']:+.4f} - {v['ci_high']:+.4f}")
        console.print(t)
        if "delong" in pair:
            d = pair["delong"]
            say(f"DeLong: AUC {d['auc_a']:.4f} vs {d['auc_b']:.4f}, difference {d['difference']:+.4f} "
                f"({ci}% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}), z = {d['z']:.3f}, p = {d['p_value']:.4g}")
        m = pair["mcnemar"]
        say(f"McNemar at each run's operating point: {m['a_right_b_wrong']} cases only A right, "
            f"{m['a_wrong_b_right']} only B right, exact p = {m['p_value']:.4g}")
    console.print(f"comparison: [bold]{out / 'compare.html'}[/]")


def report(run_dir: Path = typer.Argument(..., help="a run folder")) -> None:
    """(Re)write report.html of a run."""
    from medlens.report.html import write_report

    console.print(f"report: [bold]{write_report(run_dir)}[/]")
