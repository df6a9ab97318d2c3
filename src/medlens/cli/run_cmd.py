"""``medlens train|evaluate|predict|report``: the run-folder lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress_step, quiet_libraries


def _metrics_table(results: dict, split: str, title: str | None = None) -> Table:
    from medlens.report.html import PRETTY

    unit = f" ({results['distance_unit']})" if "distance_unit" in results else ""
    t = Table(title=title or f"{results.get('dataset')} - {split} (n={results[split]['n']}), 95% bootstrap CI")
    for col in ("metric", "value", "95% CI"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for k, v in results[split]["metrics"].items():
        t.add_row(PRETTY.get(k, k) + (unit if k in ("hd95", "msd") else ""), f"{v['value']:.3f}", f"{v['ci_low']:.3f} - {v['ci_high']:.3f}")
    return t


def _print_clinical(results: dict, split: str) -> None:
    """Calibration before/after scaling and any validation-to-test drift, in plain words."""
    cal = results.get("calibration")
    if cal and cal.get(split):
        c = cal[split]
        line = f"calibration ({split}): ECE {c['before']['ece']['value']:.3f} uncalibrated"
        if "after" in c:
            line += f", {c['after']['ece']['value']:.3f} after {cal['method']} scaling (fitted on validation)"
        console.print(line, markup=False, highlight=False)
    for flag in results.get("shift", {}).get("flags", []):
        console.print(f"warning: {flag}", style="yellow", markup=False, highlight=False)


def _auto_plan(source: Path, budget: str | None, seed: int, sets: list[str], run_dir: Path | None):
    """``train --auto``: the plan of ``source`` (its clock started now), written beside the run folder."""
    import time

    started = time.monotonic()  # before the imports: loading the training chain is part of the budget
    from medlens.cli.plan_cmd import print_plan
    from medlens.errors import ConfigError
    from medlens.workflow.plan import make_plan, write_plan
    from medlens.workflow.train import resolve_run_dir

    if budget is None:
        raise ConfigError("--auto needs --budget (e.g. --budget 15m): the plan is fitted to it")
    cfg = make_plan(str(source), budget, seed=seed, overrides=sets, started=started,
                    log=lambda s: console.print(s, markup=False, highlight=False))
    run = resolve_run_dir(cfg, run_dir)
    out = write_plan(cfg, run.parent / f"{run.name}.plan.yaml")
    print_plan(cfg, out)
    return cfg


def register(app: typer.Typer) -> None:
    @app.command()
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
        import json

        from medlens.config import load_config
        from medlens.run import Run
        from medlens.workflow.train import train as do_train
        quiet_libraries()
        extra = [f"train.{k}={v}" for k, v in (("devices", devices), ("num_nodes", num_nodes),
                                               ("strategy", strategy)) if v is not None]
        if auto:
            cfg = _auto_plan(config, budget, seed or 0, list(set_) + extra, run_dir)
        else:
            if budget is not None or seed is not None:
                from medlens.errors import ConfigError

                raise ConfigError("--budget and --seed are for --auto (plan and train); a config sets its own "
                                  "seed and time limit (seed, train.max_minutes)")
            cfg = load_config(config, list(set_) + extra)
        if dry_run:
            from medlens.engine.distributed import plan

            p = plan(cfg.train)
            console.print(json.dumps({"config": str(config), "rank": p.rank, **p.summary()}), markup=False,
                          highlight=False)
            return
        run = do_train(cfg, run_dir=run_dir, resume=resume, overwrite=overwrite, progress_bar=not quiet,
                       log=lambda s: console.print(s, markup=False, highlight=False))
        from medlens.engine.distributed import global_rank

        if global_rank() != 0:  # data parallel under torchrun/srun: rank 0 reports
            return
        results = json.loads((run / "metrics.json").read_text())
        console.print(_metrics_table(results, "test"))
        if "reference_observer" in results:
            console.print(_metrics_table({**results, "ref": results["reference_observer"]}, "ref",
                                         "second observer against the same reference (human level)"))
        _print_clinical(results, "test")
        meta = Run.open(run).meta
        if meta.threshold is not None:
            console.print(f"threshold {meta.threshold.value:.4f} ({meta.threshold.rule}, chosen on validation)",
                          markup=False, highlight=False)
        console.print(f"trained in {meta.train_seconds} s; report: [bold]{run / 'report.html'}[/]")

    @app.command()
    def evaluate(run_dir: Path = typer.Argument(..., help="a run folder"),
                 split: str = typer.Option("test", "--split", help="test or val")) -> None:
        """Re-evaluate a trained run on a split (threshold always from validation)."""
        from medlens.errors import MedlensError
        from medlens.evaluation.evaluate import evaluate_run
        from medlens.report.html import write_report

        if split not in ("test", "val"):
            raise MedlensError(f"--split must be test or val, not '{split}'")
        quiet_libraries()
        from medlens.run import Run
        from medlens.tasks import get_task

        run = Run.open(run_dir)
        run.require_weights()
        if get_task(run.task).dense:
            from medlens.evaluation.segmentation import evaluate_segmentation_run

            with progress_step("evaluating") as report:
                results = evaluate_segmentation_run(run, split=split, progress=report)
        else:
            results = evaluate_run(run, split=split)
        write_report(run)
        console.print(_metrics_table(results, split))
        _print_clinical(results, split)

    @app.command()
    def recalibrate(run_dir: Path = typer.Argument(..., help="a trained classifier run"),
                    on: Path = typer.Option(..., "--on", help="the site's labelled sample: a CSV manifest "
                                                               "path,label[,patient_id], paths relative to it"),
                    out: Path = typer.Option(..., "--out", help="the new run folder (the original is not changed)"),
                    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder")) -> None:
        """Refit calibration and threshold on a site's own labelled sample, into a new run folder."""
        import json

        from medlens.run import Run
        from medlens.workflow.recalibrate import recalibrate as do_recalibrate

        quiet_libraries()
        new = do_recalibrate(run_dir, on, out, overwrite)
        meta = Run.open(new).meta
        if meta.threshold is not None:
            console.print(f"threshold {meta.threshold.value:.4f} ({meta.threshold.rule}, chosen on the site sample "
                          f"of {meta.recalibrated_on['n']} cases)", markup=False, highlight=False)
        results = json.loads((new / "metrics.json").read_text())
        console.print(_metrics_table(results, "test"))
        _print_clinical(results, "test")
        console.print(f"recalibrated run: [bold]{new}[/]")

    @app.command()
    def compare(runs: List[Path] = typer.Argument(..., help="two or more run folders; the first is the reference"),
                out: Path = typer.Option(Path("comparison"), "--out", help="folder for compare.json, compare.html "
                                                                             "and the ROC plot"),
                bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples of the differences"),
                seed: int = typer.Option(0, "--seed")) -> None:
        """Compare runs on the same test cases: paired DeLong, McNemar, bootstrap CIs of differences."""
        from medlens.report.compare import write_comparison

        quiet_libraries()
        res = write_comparison(runs, out, n_boot=bootstrap, seed=seed)
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
                console.print(f"DeLong: AUC {d['auc_a']:.4f} vs {d['auc_b']:.4f}, difference {d['difference']:+.4f} "
                              f"({ci}% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}), z = {d['z']:.3f}, "
                              f"p = {d['p_value']:.4g}", markup=False, highlight=False)
            m = pair["mcnemar"]
            console.print(f"McNemar at each run's operating point: {m['a_right_b_wrong']} cases only A right, "
                          f"{m['a_wrong_b_right']} only B right, exact p = {m['p_value']:.4g}",
                          markup=False, highlight=False)
        console.print(f"comparison: [bold]{out / 'compare.html'}[/]")

    @app.command()
    def predict(run_dir: Path = typer.Argument(..., help="a run folder"),
                files: Optional[List[Path]] = typer.Argument(None, help="PNG/JPEG/TIFF/NPZ/NPY (DICOM, NIfTI, MHD, NRRD)"),
                out: Optional[Path] = typer.Option(None, "--out", help="new folder: predictions.csv (+ --outputs)"),
                outputs: Optional[str] = typer.Option(None, "--outputs", help="DICOM inputs: 'sr,fhir' (segmentation "
                                                      "runs: 'sr,seg,fhir') TID 1500 SR, DICOM SEG, FHIR R5 Bundle"),
                from_pacs: Optional[str] = typer.Option(None, "--from-pacs", help="pull --study from this PACS "
                                                        "(DICOMweb root or dimse://AET@host:port) and predict it"),
                study: Optional[str] = typer.Option(None, "--study", help="Study Instance UID (with --from-pacs)"),
                push: bool = typer.Option(False, "--push", help="store the SR (and SEG) back to the --from-pacs PACS"),
                allow_http: bool = typer.Option(False, "--allow-http", help="--from-pacs: allow plain http:// (or "
                                                "DIMSE, not encrypted) to a host other than this machine"),
                deidentify: bool = typer.Option(False, "--deidentify", help="build every export from PS3.15 "
                                                "de-identified source attributes"),
                deid_key: Optional[str] = typer.Option(None, "--deid-key", help="UID remapping key (as medlens deid)"),
                allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="predict with a run whose "
                                                      "training did not finish (status not 'complete')")
                ) -> None:
        """Predict image files with a trained run (a segmentation run with --from-pacs segments the study)."""
        from medlens.errors import MedlensError
        from medlens.run import Predictor, Run

        quiet_libraries()
        Run.open(run_dir).require_complete(allow_incomplete)   # issue 25: finished runs only, unless asked
        if from_pacs or study or push:
            return _from_pacs(run_dir, from_pacs, study, push, out, outputs, deidentify, deid_key, allow_http)
        if not files:
            raise MedlensError("give image files to predict, or --from-pacs URL --study UID")
        run = Run.open(run_dir, expect="classification")
        if out is not None or outputs:
            from medlens.workflow.interop import parse_outputs, predict_export

            if out is None:
                raise MedlensError("--outputs needs --out FOLDER")
            rows, done = predict_export(run, files, out, parse_outputs(outputs, False), deidentify=deidentify,
                                        deid_key=deid_key)
        else:
            rows, done = Predictor(run).predict_files([str(f) for f in files]), []
        t = Table(title=f"predictions ({run_dir})")
        for col in ("file", "prediction", "probability", "all classes"):
            t.add_column(col)
        for r in rows:
            t.add_row(Path(r.source).name, r.prediction, f"{r.probability:.3f}",
                      ", ".join(f"{k}: {v:.3f}" for k, v in r.probabilities.items()))
        console.print(t)
        if out is not None:
            console.print(f"wrote [bold]{out}[/] (predictions.csv{_listing(done)})")

    def _listing(done) -> str:
        n = {}
        for ex in done:
            for k in ex.files:
                n[k] = n.get(k, 0) + 1
        return "".join(f", {v} {k.upper()}" for k, v in n.items())

    def _from_pacs(run_dir, url, study, push, out, outputs, deidentify, deid_key, allow_http=False) -> None:
        from medlens.errors import MedlensError
        from medlens.workflow.interop import pacs_round_trip

        if not url or not study:
            raise MedlensError("--from-pacs URL and --study UID go together (--push stores the results back)")
        if out is None:
            raise MedlensError("--from-pacs needs --out FOLDER for the local copy of the results")
        from medlens.io.net import shown_url

        res = pacs_round_trip(run_dir, url, study, out, outputs, push=push, deidentify=deidentify, deid_key=deid_key,
                              allow_http=allow_http)
        console.print(f"{res.n_inputs} input(s) from study {study}: wrote [bold]{out}[/] ({_listing(res.exported)[2:]})"
                      + (f"; stored {res.pushed} instance(s) at {shown_url(url)}" if push else ""))

    @app.command()
    def segment(run_dir: Path = typer.Argument(..., help="a segmentation run folder"),
                files: List[Path] = typer.Argument(..., help="images: PNG/JPEG (2D) or NIfTI/NRRD/MHD/DICOM (3D)"),
                out: Path = typer.Option(..., "--out", help="folder for the masks and overlays"),
                tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="average over flips (default: the run's)"),
                overlay: bool = typer.Option(True, "--overlay/--no-overlay", help="also write an overlay PNG"),
                dicom_seg: bool = typer.Option(False, "--dicom-seg", help="DICOM series inputs: also write a DICOM "
                                               "SEG (it copies the source's patient/study attributes, as the "
                                               "standard requires)"),
                outputs: Optional[str] = typer.Option(None, "--outputs", help="DICOM series inputs: 'sr,seg,fhir': "
                                                      "TID 1500 SR, DICOM SEG (codes from the config), FHIR Bundle"),
                deidentify: bool = typer.Option(False, "--deidentify", help="build every export from PS3.15 "
                                                "de-identified source attributes"),
                deid_key: Optional[str] = typer.Option(None, "--deid-key", help="UID remapping key (as medlens deid)")
                ) -> None:
        """Segment files with a trained U-Net: a mask per input in its geometry (PNG 2D, NIfTI 3D) + overlay."""
        from medlens.workflow.segment import segment_files

        quiet_libraries()
        if outputs or deidentify:
            from medlens.run import Run
            from medlens.workflow.interop import parse_outputs, segment_export

            wanted = parse_outputs(outputs or "seg", True) | ({"seg"} if dicom_seg else set())
            rows, _ = segment_export(Run.open(run_dir, expect="segmentation"), [Path(f) for f in files], out, wanted,
                                     tta=tta, overlay=overlay, deidentify=deidentify, deid_key=deid_key)
        else:
            rows = segment_files(run_dir, [Path(f) for f in files], out, tta=tta, overlay=overlay,
                                 dicom_seg=dicom_seg)
        t = Table(title=f"segmentation ({run_dir})")
        for col in ("file", "mask", "foreground voxels", "area / volume"):
            t.add_column(col)
        for r in rows:
            size = (f"{r['foreground_mm3']:.0f} mm3" if "foreground_mm3" in r else
                    f"{r['foreground_mm2']:.1f} mm2" if "foreground_mm2" in r else "-")
            extra = "".join(f" + {r[k]}" for k in ("dicom_seg", "dicom_sr", "fhir") if k in r)
            t.add_row(Path(r["file"]).name, r["mask"] + extra, str(r["foreground_voxels"]), size)
        console.print(t)

    @app.command()
    def report(run_dir: Path = typer.Argument(..., help="a run folder")) -> None:
        """(Re)write report.html of a run."""
        from medlens.report.html import write_report

        console.print(f"report: [bold]{write_report(run_dir)}[/]")
