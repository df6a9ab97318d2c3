"""``medlens nodules extract|lidc|detect|froc``: LUNA16/LIDC patch stores, reader annotations, whole-scan detection and
the LUNA16 FROC."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress

app = typer.Typer(help="Lung nodules: patch extraction (LUNA16), LIDC reader annotations, whole-scan detection and FROC.", no_args_is_help=True)


@app.command()
def extract(scans: List[Path] = typer.Option(..., "--scans", help="folder of <seriesuid>.mhd scans or DICOM series "
                                              "(repeat for several folders)"),
            annotations: Path = typer.Option(..., "--annotations", help="LUNA16 annotations.csv"),
            out: Path = typer.Option(..., "--out", help="HDF5 store to write (.h5)"),
            candidates: Optional[Path] = typer.Option(None, "--candidates", help="LUNA16 candidates.csv (negatives)"),
            dims: int = typer.Option(2, "--dims", help="2 (axial patches, as the seed) or 3 (cubes)"),
            size: Optional[int] = typer.Option(None, "--size", help="patch size (default 50 for 2D, 32 for 3D)"),
            spacing: float = typer.Option(1.0, "--spacing", help="3D: isotropic spacing in mm"),
            neg_ratio: float = typer.Option(5.0, "--neg-ratio", help="negatives per positive (seed: 5)"),
            no_augment: bool = typer.Option(False, "--no-augment", help="no rotated copies of positives"),
            negative_scans: bool = typer.Option(False, "--negative-scans", help="scans no CSV row names are "
                                                "nodule-free (LUNA16): sample negatives from them too"),
            seed: int = typer.Option(0, "--seed")) -> None:
    """Extract nodule / non-nodule patches around world coordinates into an HDF5 store."""
    from medlens.workflow.nodules import extract_patches

    folders: list[str | Path] = list(scans)
    with warnings.catch_warnings(record=True) as caught, progress() as bar:
        warnings.simplefilter("always")
        task = bar.add_task("scans", total=None)
        rep = extract_patches(folders, annotations, out, candidates=candidates, dims=dims, size=size, spacing=spacing,
                              neg_ratio=neg_ratio, augment_positives=not no_augment, seed=seed, negative_scans=negative_scans,
                              progress=lambda i, n, uid: bar.update(task, completed=i, total=n))
    for w in caught:
        if "skipped" in str(w.message):
            console.print(f"[yellow]warning:[/] {w.message}")
    console.print(f"[green]wrote[/] {rep.path}: {rep.positives} positives (+{rep.augmented} augmented), "
                  f"{rep.negatives} negatives from {rep.scans} scan(s) in {rep.seconds:.1f} s")


@app.command()
def lidc(xml: Path = typer.Argument(..., help="LIDC-IDRI reader XML"),
         scan: Path = typer.Argument(..., help="the matching DICOM series folder (or .mhd)"),
         small: bool = typer.Option(False, "--small", help="include < 3 mm nodules (centre marks)"),
         mask_out: Optional[Path] = typer.Option(None, "--mask-out",
                                                 help="write the consensus nodule mask on the scan's grid "
                                                      "(.nii.gz, .nrrd, .mhd): a segmentation target"),
         outputs: Optional[str] = typer.Option(None, "--outputs", help="DICOM series: 'sr,seg,fhir': a TID 1500 SR "
                                               "(a volumetric group per nodule), a DICOM SEG, a FHIR R5 Bundle"),
         out: Optional[Path] = typer.Option(None, "--out", help="new folder for --outputs"),
         deidentify: bool = typer.Option(False, "--deidentify", help="build the exports from PS3.15 de-identified "
                                         "source attributes"),
         deid_key: Optional[str] = typer.Option(None, "--deid-key", help="UID remapping key (as medlens deid)")
         ) -> None:
    """Reader-marked nodules: clustered marks, readers, diameter, consensus volume, malignancy."""
    from medlens.data.lidc import cluster_nodules, parse_lidc_xml
    from medlens.errors import MedlensError
    from medlens.io import load
    from medlens.io.writers import check_output

    if mask_out is not None:
        check_output(mask_out)  # before the work: e.g. a path SimpleITK cannot take
    if outputs or deidentify:
        from medlens.workflow.interop import export_nodules, parse_outputs

        if out is None:
            raise MedlensError("--outputs needs --out FOLDER")
        ex = export_nodules(xml, scan, out, parse_outputs(outputs or "sr,seg", True), include_small=small,
                            deidentify=deidentify, deid_key=deid_key)
        for f in ex.values.get("findings", []):
            console.print(f"{f['label']}: {f['volume_mm3']:.1f} mm3, maximum 3D diameter {f['max_diameter_mm']:.2f} mm, "
                          f"mean {f['mean']:.1f} (SD {f['sd']:.1f})", markup=False, highlight=False)
        console.print(f"wrote [bold]{out}[/]: " + ", ".join(Path(p).name for p in ex.files.values()))
    ann = parse_lidc_xml(xml)
    image = load(scan)
    t = Table(title=f"{xml.name}: {len(ann.readers)} readers, {len(ann.nodules)} nodule marks, "
                    f"{len(ann.non_nodules)} non-nodule marks")
    for c in ("#", "readers", "centre x, y, z (mm)", "diameter (mm, vol-equiv.)", "axial extent (mm)",
              "consensus volume (mm3)", "malignancy (mean)"):
        t.add_column(c, justify="right")
    for i, p in enumerate(cluster_nodules(ann, image, include_small=small)):
        t.add_row(str(i + 1), str(p.n_readers), ", ".join(f"{v:.1f}" for v in p.centroid_world), f"{p.diameter_mm:.1f}",
                  f"{p.axial_diameter_mm:.1f}", f"{p.consensus_volume_mm3:.0f}",
                  "-" if p.malignancy is None else f"{p.malignancy:.2f}")
    console.print(t)
    if mask_out is not None:
        import numpy as np

        from medlens.data.lidc import consensus_mask_image
        from medlens.io.writers import save

        m = consensus_mask_image(ann, image, include_small=small)
        save(m, mask_out)
        vol = float(m.array.sum() * np.prod(image.spacing))
        console.print(f"consensus mask: {int(m.array.sum())} voxels, {vol:.0f} mm3 -> [bold]{mask_out}[/]")


@app.command()
def detect(scans: List[Path] = typer.Argument(..., help="chest CTs: <seriesuid>.mhd files or DICOM series folders"),
           out: Path = typer.Option(..., "--out", help="new folder: candidates.csv, sr/, gallery/, detections.json"),
           run: Optional[Path] = typer.Option(None, "--run", help="a trained patch classifier run (false-positive "
                                              "reduction); it must not have seen these scans. Without it: the "
                                              "classical blob ranking"),
           annotations: Optional[Path] = typer.Option(None, "--annotations", help="LUNA16 annotations.csv: score "
                                                      "the result (FROC)"),
           excluded: Optional[Path] = typer.Option(None, "--excluded", help="LUNA16 annotations_excluded.csv"),
           max_candidates: int = typer.Option(300, "--max-candidates", help="strongest blobs kept per scan"),
           no_sr: bool = typer.Option(False, "--no-sr", help="no DICOM SR"),
           bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap samples over scans (FROC CI)"),
           seed: int = typer.Option(0, "--seed")) -> None:
    """Whole-scan nodule detection: LoG blob candidates in the lungs, scored by a patch classifier run."""
    from medlens.workflow.detect import PIPELINE_CHECK, detect_scans

    paths: list[str | Path] = list(scans)
    with warnings.catch_warnings(record=True) as caught, progress() as bar:
        warnings.simplefilter("always")
        task = bar.add_task("scans", total=None)
        rep = detect_scans(paths, out, run, max_candidates=max_candidates, sr=not no_sr, annotations=annotations,
                           excluded=excluded, n_boot=bootstrap, seed=seed,
                           progress=lambda i, n, what: bar.update(task, completed=i, total=n))
    for w in caught:
        if "scan" in str(w.message):
            console.print(f"warning: {w.message}", markup=False, highlight=False)
    t = Table(title=f"classifier: {rep.classifier}; threshold "
                    f"{'none' if rep.threshold is None else format(rep.threshold, '.3f')}")
    for c in ("scan (seriesuid end)", "slices", "candidates", ">= threshold", "candidates s", "classifier s", "total s"):
        t.add_column(c, justify="right")
    thr = rep.threshold if rep.threshold is not None else 0.5
    for d in rep.scans:
        t.add_row("..." + d.seriesuid[-12:], str(d.slices), str(len(d.candidates)),
                  str(int((d.candidates.probability >= thr).sum())), f"{d.seconds_candidates:.1f}",
                  f"{d.seconds_classifier:.1f}", f"{d.seconds:.1f}")
    console.print(t)
    if rep.froc is not None:
        _print_froc(rep.froc)
    for n in rep.notes:
        if rep.froc is None or n != PIPELINE_CHECK:  # _print_froc said it already
            console.print(n, markup=False, highlight=False)
    console.print(f"wrote [bold]{out}[/]: candidates.csv, detections.json, gallery/index.html"
                  + (", sr/" if any(d.sr for d in rep.scans) else "") + (", froc.json, froc.png" if rep.froc else ""))


MAX_SCAN_COLUMNS = 8


def _print_froc(res) -> None:
    from medlens.workflow.detect import PIPELINE_CHECK

    # per-scan columns for a handful of scans (the pipeline check); for more, the table would be unreadable and
    # the per-scan counts are in --json
    uids = [s.seriesuid for s in res.scans] if len(res.scans) <= MAX_SCAN_COLUMNS else []
    ci = res.ci.get("cpm", (float("nan"),) * 2)
    t = Table(title=f"FROC (LUNA16 rules): CPM {res.cpm:.3f} (95% CI over scans {ci[0]:.3f}-{ci[1]:.3f}); "
                    f"{res.n_scans} scan(s), {res.n_nodules} nodule(s), {res.n_candidates} candidates, "
                    f"{res.n_ignored} on excluded findings (ignored)")
    for c in ["FPs/scan", "sensitivity", "threshold"] + [f"FPs ...{u[-8:]}" for u in uids] + \
             [f"hits ...{u[-8:]}" for u in uids]:
        t.add_column(c, justify="right")
    for o in res.operating_points:
        t.add_row(f"{o['fp_rate']:g}", f"{o['sensitivity']:.3f}", f"{o['threshold']:.3f}",
                  *[str(o["fps"][u]) for u in uids], *[f"{o['nodules_hit'][u]}/{len(s.nodule_scores)}"
                                                       for u, s in zip(uids, res.scans)])
    console.print(t)
    if not uids:
        console.print(f"per-scan counts of the {res.n_scans} scans: --json", markup=False, highlight=False)
    if res.n_scans < 10:
        console.print(PIPELINE_CHECK, markup=False, highlight=False)


@app.command()
def froc(candidates: Path = typer.Argument(..., help="LUNA16 candidates CSV: seriesuid,coordX,coordY,coordZ,probability"),
         annotations: Path = typer.Argument(..., help="LUNA16 annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm)"),
         excluded: Optional[Path] = typer.Option(None, "--excluded", help="annotations_excluded.csv: findings that "
                                                 "are neither hits nor false positives"),
         also: List[Path] = typer.Option([], "--also", help="more candidates CSVs, scored together (repeatable)"),
         scans_csv: Optional[Path] = typer.Option(None, "--scans", help="CSV with a seriesuid column: the scans "
                                                  "scored (scans without candidates count too); default: the "
                                                  "scans the candidates name"),
         plot: Optional[Path] = typer.Option(None, "--plot", help="write the FROC plot (.png)"),
         json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures as JSON"),
         bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap samples over scans"),
         seed: int = typer.Option(0, "--seed")) -> None:
    """LUNA16 FROC: hits within the nodule radius, excluded findings ignored, CPM with a bootstrap CI over scans."""
    from medlens.evaluation.froc import froc_files
    from medlens.utils import atomic_path

    scans = None
    if scans_csv is not None:
        from medlens.data.base import read_csv_checked

        scans = read_csv_checked(scans_csv, ["seriesuid"], "scan list CSV (seriesuid)")["seriesuid"].astype(str).tolist()
    with warnings.catch_warnings(record=True) as caught, progress() as bar:
        warnings.simplefilter("always")
        tasks: dict = {}

        def step(done: int, total: int, what: str) -> None:  # one bar per phase: matching scans, then bootstrap
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        res = froc_files([candidates, *also], annotations, excluded, scans, n_boot=bootstrap, seed=seed, plot=plot,
                         progress=step)
    for w in caught:
        if "no row" in str(w.message):
            console.print(f"warning: {w.message}", markup=False, highlight=False)
    _print_froc(res)
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            Path(tmp).write_text(json.dumps(res.as_dict(), indent=2, default=float))
    if plot is not None:
        console.print(f"FROC plot: [bold]{plot}[/]")
