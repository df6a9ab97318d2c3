"""``medlens predict|segment``: a trained run applied to files, or to a study pulled from a PACS."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress_step, quiet_libraries, say

TABLE_SUFFIXES = (".csv", ".parquet")   # --out naming a results table: batch mode
DEID_KEY_HELP = "UID remapping key (as medlens deid)"
ALLOW_OOP_HELP = ("export SR/SEG/FHIR (and --push) even for an input outside the run's training data (modality, "
                  "body part, colour, size, intensities); the SR and FHIR then say so, with the reasons")


def predict(run_dir: Path = typer.Argument(..., help="a run folder"),
            files: Optional[List[Path]] = typer.Argument(None, help="PNG/JPEG/TIFF/NPZ/NPY (DICOM, NIfTI, MHD, NRRD); "
                                                         "with --out X.csv|X.parquet also folders, @list.txt, "
                                                         "CSV manifests"),
            out: Optional[Path] = typer.Option(None, "--out", help="new folder: predictions.csv (+ --outputs); or a "
                                               "results table X.csv / X.parquet: batch mode (streamed, resumable)"),
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
            deid_key: Optional[str] = typer.Option(None, "--deid-key", help=DEID_KEY_HELP),
            allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="predict with a run whose "
                                                  "training did not finish (status not 'complete')"),
            allow_out_of_profile: bool = typer.Option(False, "--allow-out-of-profile", help=ALLOW_OOP_HELP),
            resume: bool = typer.Option(False, "--resume", help="batch mode: continue the results table a killed "
                                        "run left (same INPUTs): no input twice, none missed"),
            batch_size: int = typer.Option(64, "--batch-size", min=1, help="batch mode: inputs per batch"),
            workers: int = typer.Option(2, "--workers", min=0, help="batch mode: decoding processes (local, at "
                                        "most the CPUs - 1: the network needs one) or Ray actors (--engine ray)"),
            engine: str = typer.Option("local", "--engine", help="batch mode: local, or ray (Ray Data)"),
            address: Optional[str] = typer.Option(None, "--address", help="--engine ray: a running Ray cluster "
                                                  "(default: start a local instance, stopped at the end)"),
            ) -> None:
    """Predict image files with a trained run (a segmentation run with --from-pacs segments the study).

    With --out X.csv or X.parquet: batch mode over an archive, one row per input (file, class, probabilities,
    out-of-profile warning), appended per batch; unreadable inputs go to X.errors.csv. Exit 0, or 3 when some
    inputs were listed in the errors file."""
    from medlens.errors import MedlensError
    from medlens.run import Predictor, Run

    quiet_libraries()
    Run.open(run_dir).require_complete(allow_incomplete)   # issue 25: finished runs only, unless asked
    if from_pacs or study or push:
        return _from_pacs(run_dir, from_pacs, study, push, out, outputs, deidentify, deid_key, allow_http,
                          allow_out_of_profile)
    if not files:
        raise MedlensError("give image files to predict, or --from-pacs URL --study UID")
    run = Run.open(run_dir, expect="classification")
    if out is not None and out.suffix.lower() in TABLE_SUFFIXES:   # batch mode (medlens.run.batch)
        if outputs:
            raise MedlensError("--outputs (SR/SEG/FHIR) writes into a folder: give --out FOLDER, not a table")
        return _predict_table(run, [str(f) for f in files], out, resume, batch_size, workers, engine, address)
    if resume or engine != "local" or address:
        raise MedlensError("--resume, --engine and --address are for batch mode: --out results.csv|.parquet")
    paths: list[str | Path] = list(files)
    if out is not None or outputs:
        from medlens.workflow.interop import parse_outputs, predict_export  # DICOM exports: only when asked

        if out is None:
            raise MedlensError("--outputs needs --out FOLDER")
        rows, done = predict_export(run, paths, out, parse_outputs(outputs, False), deidentify=deidentify,
                                    deid_key=deid_key, allow_out_of_profile=allow_out_of_profile)
    else:
        rows, done = Predictor(run).predict_files([str(f) for f in files]), []
    console.print(_prediction_table(run_dir, rows))
    if out is not None:
        console.print(f"wrote [bold]{out}[/] (predictions.csv{_listing(done)})")


def _predict_table(run: Any, inputs: list[str], out: Path, resume: bool, batch_size: int, workers: int,
                   engine: str, address: str | None) -> None:
    """Batch mode: stream the inputs into a results table; one summary line; exit 3 when some inputs failed."""
    from medlens.errors import MedlensError
    from medlens.run import Predictor
    from medlens.run.batch import collect_inputs, predict_archive

    if engine not in ("local", "ray"):
        raise MedlensError(f"--engine is local or ray, not {engine!r}")
    if address and engine != "ray":
        raise MedlensError("--address is for --engine ray")
    predictor = Predictor(run)
    files = collect_inputs(inputs, predictor.spec.spatial_dims, run.config.data.path_column)
    with progress_step("predicting", len(files)) as report:
        if engine == "ray":
            from medlens.run.batch_ray import ray_batches, ray_session

            with ray_session(address, num_cpus=max(workers, 1)):
                s = predict_archive(predictor, files, out, resume=resume, progress=report, engine=lambda todo:
                                    ray_batches(run.dir, todo, batch_size, max(workers, 1), predictor.tta))
        else:
            s = predict_archive(predictor, files, out, resume=resume, batch_size=batch_size, workers=workers,
                                progress=report)
    say(f"{s.n_inputs} input(s): {s.predicted} predicted ({s.out_of_profile} outside the training data), "
        f"{s.errors} error(s){f' listed in {s.errors_file}' if s.errors else ''}"
        f"{f', {s.already_done} done before (--resume)' if s.already_done else ''}; wrote {out}"
        + (f" ({s.files_per_second:.0f} files/s)" if s.predicted + s.errors else ""))
    if s.errors:
        raise typer.Exit(3)


def _prediction_table(run_dir: Path, rows: list[Any]) -> Table:
    """The predicted class and its probability, then (binary) the probability of the positive class, named; a
    numeric target's value with its prediction interval (issue 26)."""
    positive = next((r.positive_class for r in rows if r.positive_class), None)
    t = Table(title=f"predictions ({run_dir})")
    if rows and getattr(rows[0], "value", None) is not None:
        for col in ("file", "predicted value", "interval low", "interval high"):
            t.add_column(col)
        for r in rows:
            unit = f" {r.unit}" if r.unit and r.unit != "1" else ""
            lo, hi = ((f"{r.lower:.4g}", f"{r.upper:.4g}") if r.lower is not None and r.upper is not None
                      else ("-", "-"))
            t.add_row(Path(r.source).name, f"{r.value:.4g}{unit}", lo, hi)
        return t
    for col in ("file", "predicted class", "P(predicted class)", *([f"P({positive})"] if positive else []),
                "all classes"):
        t.add_column(col)
    for r in rows:
        t.add_row(Path(r.source).name, r.prediction, f"{r.predicted_probability:.3f}",
                  *([f"{r.probability:.3f}"] if positive else []),
                  ", ".join(f"{k}: {v:.3f}" for k, v in r.probabilities.items()))
    return t


def _listing(done: Iterable[Any]) -> str:
    """", 2 SR, 2 FHIR": how many files of each kind the exports wrote."""
    n: dict[str, int] = {}
    for ex in done:
        for k in ex.files:
            n[k] = n.get(k, 0) + 1
    return "".join(f", {v} {k.upper()}" for k, v in n.items())


def _from_pacs(run_dir: Path, url: str | None, study: str | None, push: bool, out: Path | None, outputs: str | None,
               deidentify: bool, deid_key: str | None, allow_http: bool = False,
               allow_out_of_profile: bool = False) -> None:
    from medlens.errors import MedlensError
    from medlens.io.net import shown_url
    from medlens.workflow.interop import pacs_round_trip

    if not url or not study:
        raise MedlensError("--from-pacs URL and --study UID go together (--push stores the results back)")
    if out is None:
        raise MedlensError("--from-pacs needs --out FOLDER for the local copy of the results")
    res = pacs_round_trip(run_dir, url, study, out, outputs, push=push, deidentify=deidentify, deid_key=deid_key,
                          allow_http=allow_http, allow_out_of_profile=allow_out_of_profile)
    console.print(f"{res.n_inputs} input(s) from study {study}: wrote [bold]{out}[/] ({_listing(res.exported)[2:]})"
                  + (f"; stored {res.pushed} instance(s) at {shown_url(url)}" if push else ""))


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
            deid_key: Optional[str] = typer.Option(None, "--deid-key", help=DEID_KEY_HELP),
            allow_out_of_profile: bool = typer.Option(False, "--allow-out-of-profile", help=ALLOW_OOP_HELP)
            ) -> None:
    """Segment files with a trained U-Net: a mask per input in its geometry (PNG 2D, NIfTI 3D) + overlay."""
    from medlens.workflow.segment import segment_files

    quiet_libraries()
    paths: list[str | Path] = [Path(f) for f in files]
    if outputs or deidentify:
        from medlens.run import Run
        from medlens.workflow.interop import parse_outputs, segment_export  # DICOM exports: only when asked

        wanted = parse_outputs(outputs or "seg", True) | ({"seg"} if dicom_seg else set())
        rows, _ = segment_export(Run.open(run_dir, expect="segmentation"), paths, out, wanted,
                                 tta=tta, overlay=overlay, deidentify=deidentify, deid_key=deid_key,
                                 allow_out_of_profile=allow_out_of_profile)
    else:
        rows = segment_files(run_dir, paths, out, tta=tta, overlay=overlay, dicom_seg=dicom_seg,
                             allow_out_of_profile=allow_out_of_profile)
    t = Table(title=f"segmentation ({run_dir})")
    for col in ("file", "mask", "foreground voxels", "area / volume"):
        t.add_column(col)
    for r in rows:
        size = (f"{r['foreground_mm3']:.0f} mm3" if "foreground_mm3" in r else
                f"{r['foreground_mm2']:.1f} mm2" if "foreground_mm2" in r else "-")
        extra = "".join(f" + {r[k]}" for k in ("dicom_seg", "dicom_sr", "fhir") if k in r)
        t.add_row(Path(r["file"]).name, r["mask"] + extra, str(r["foreground_voxels"]), size)
    console.print(t)
