"""``medlens info|convert|deid|view``: look at, convert and de-identify medical images."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress

if TYPE_CHECKING:  # types only: nothing is imported at run time
    from medlens.io import Image

_ALLOW_OUTSIDE_HELP = "read an .mhd/.nhdr whose data file lies outside its folder (only for headers you trust)"


def _load(path: Path, series: Optional[str], allow_gaps: bool, allow_outside: bool = False) -> Image:
    from medlens.io import load

    if path.is_dir():
        return load(path, series_uid=series, on_gap="warn" if allow_gaps else "error")
    return load(path, allow_outside=allow_outside)


def _world_point(text: str) -> list[float]:
    from medlens.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--point '{text}' must be three finite numbers x,y,z in mm")
    return values


def info(path: Path = typer.Argument(..., help="image file or DICOM folder"),
         series: Optional[str] = typer.Option(None, "--series", help="series id when a folder holds several"),
         show_phi: bool = typer.Option(False, "--show-phi", help="also print full UIDs (identifying)"),
         allow_gaps: bool = typer.Option(False, "--allow-gaps", help="load a series with missing slices"),
         allow_outside: bool = typer.Option(False, "--allow-outside", help=_ALLOW_OUTSIDE_HELP)) -> None:
    """Modality, size, spacing, orientation, intensity range, slices and series; no patient identifiers."""
    import numpy as np

    from medlens.io import orientation_code
    from medlens.io.dicom import list_series

    if path.is_dir():
        found = list_series(path)
        st = Table(title=f"series in {path.name}")
        for col in ("id", "modality", "files", "size"):
            st.add_column(col)
        for s in found:
            st.add_row(s.short_id, s.modality, str(len(s.files)), f"{s.rows}x{s.columns}")
        console.print(st)
        if show_phi:
            for s in found:
                console.print(f"{s.short_id}: SeriesInstanceUID {s.series_uid}", soft_wrap=True)
        if len(found) > 1 and series is None:
            console.print("several series: pass --series ID to describe one")
            return
    img = _load(path, series, allow_gaps, allow_outside)
    a = img.array
    t = Table(title=str(path.name), show_header=False)
    t.add_row("modality", img.modality)
    t.add_row("array (z, y, x)" if img.spatial_dims == 3 else "array (y, x)",
              f"{a.shape} {a.dtype}{' RGB' if img.is_rgb else ''}")
    t.add_row("spacing (mm, array order)", ", ".join(f"{s:g}" for s in img.spacing))
    t.add_row("origin (mm, x y z)", ", ".join(f"{o:.3f}" for o in img.origin))
    t.add_row("orientation", orientation_code(img))
    finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
    t.add_row("intensity range", f"{finite.min():g} .. {finite.max():g} (mean {finite.mean():.1f})")
    if img.spatial_dims == 3:
        t.add_row("slices", str(a.shape[0]))
    for k in ("PhotometricInterpretation", "Manufacturer", "ConvolutionKernel", "BurnedInAnnotation"):
        if k in img.meta:
            t.add_row(k, str(img.meta[k]))
    console.print(t)


def convert(src: Path = typer.Argument(..., help="image file or DICOM folder"),
            dst: Path = typer.Argument(..., help=".nii.gz/.nii/.mhd/.nrrd/.png/.npy, or a folder = DICOM series"),
            window: Optional[str] = typer.Option(None, "--window", help="for PNG: lung, bone, ... or 'L,W'"),
            spacing: Optional[str] = typer.Option(None, "--spacing", help="resample first, e.g. '1,1,1' (z,y,x)"),
            series: Optional[str] = typer.Option(None, "--series", help="series id in a multi-series folder"),
            allow_gaps: bool = typer.Option(False, "--allow-gaps", help="load a series with missing slices"),
            allow_outside: bool = typer.Option(False, "--allow-outside", help=_ALLOW_OUTSIDE_HELP)) -> None:
    """Convert between formats, keeping geometry (optionally resampling)."""
    from medlens.io import resample, save
    from medlens.io.writers import check_output

    check_output(dst)  # before any work: a path save() cannot write is refused at once
    img = _load(src, series, allow_gaps, allow_outside)
    if spacing:
        img = resample(img, [float(v) for v in spacing.split(",")])
    out = save(img, dst, window=window)
    n = len(out) if isinstance(out, list) else 1
    console.print(f"[green]wrote[/] {dst} ({n} file{'s' if n > 1 else ''}; {img.array.shape}, "
                  f"spacing {tuple(round(s, 4) for s in img.spacing)})")


def deid(in_dir: Path = typer.Argument(..., help="folder of DICOM, PNG, JPEG or NIfTI files"),
         out_dir: Path = typer.Argument(..., help="new (or empty) output folder"),
         key: Optional[str] = typer.Option(None, "--key", help="secret for consistent UID remapping across runs"),
         date_shift: Optional[int] = typer.Option(None, "--date-shift",
                                                  help="shift study dates by N days (other dates follow the profile)"),
         log_values: bool = typer.Option(False, "--log-values", help="log old values too (identifying!)")) -> None:
    """De-identify (DICOM: PS3.15 basic profile, UIDs remapped, private tags removed; PNG/JPEG: text and EXIF
    removed; NIfTI: description fields and extensions removed); pixels untouched."""
    from medlens.io.deid import deidentify_folder

    with progress() as bar:
        task = bar.add_task("de-identifying", total=None)
        rep = deidentify_folder(in_dir, out_dir, key=key, date_shift_days=date_shift, log_values=log_values,
                                progress=lambda d, t: bar.update(task, completed=d, total=t))
    console.print(f"[green]{rep.files} files[/] de-identified of {rep.files_in} in, {len(rep.skipped)} skipped; "
                  f"{rep.changes} attribute changes; log: {rep.log_path}")
    for reason, n in Counter(r for _, r in rep.skip_reasons).most_common():
        console.print(f"skipped {n} file(s): {reason}")
    if rep.burned_in:
        console.print(f"[yellow]{len(rep.burned_in)} image(s) have BurnedInAnnotation not 'NO'[/]: "
                      "their pixels may show identifiers; review them (listed in the log)")


def view(src: Path = typer.Argument(..., help="volume file or DICOM folder"),
         out_dir: Path = typer.Argument(..., help="folder for the PNGs"),
         window: str = typer.Option("lung", "--window", help="preset or 'L,W'"),
         point: Optional[str] = typer.Option(None, "--point", help="world x,y,z (mm) to centre the slices on"),
         mip_slab: Optional[float] = typer.Option(None, "--mip-slab", help="thickness (mm) of the coronal MIP's "
                                                  "slab, centred on the coronal slice (default 10); 0: the whole "
                                                  "volume"),
         allow_gaps: bool = typer.Option(False, "--allow-gaps", help="load a series with missing slices"),
         allow_outside: bool = typer.Option(False, "--allow-outside", help=_ALLOW_OUTSIDE_HELP)) -> None:
    """Axial, coronal and sagittal slices and a coronal slab MIP as windowed PNGs."""
    from medlens.io.views import MIP_SLAB_MM, write_views

    center = _world_point(point) if point else None  # checked before the volume is read
    img = _load(src, None, allow_gaps, allow_outside)
    if center is not None:
        center = img.world_to_voxel(center)
    slab = MIP_SLAB_MM if mip_slab is None else (None if mip_slab == 0 else mip_slab)
    for p in write_views(img, out_dir, window, center, mip_slab_mm=slab):
        console.print(f"wrote {p}")
