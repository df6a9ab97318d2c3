"""``medlens data list|info|fetch|samples|prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress, progress_step

app = typer.Typer(help="Datasets: list, describe, download, prepare.", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """All MedMNIST+ datasets, with task, channels, sizes and whether they are on disk."""
    from medlens.data.catalog import MEDMNIST
    from medlens.data.medmnist import medmnist_dir

    root = medmnist_dir()
    from rich import box

    t = Table(title=f"MedMNIST+ (record 10519652) in {root}", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("name", no_wrap=True, style="bold")
    for col in ("dim", "task", "classes", "ch", "train/val/test", "sizes", "on disk"):
        t.add_column(col, no_wrap=True)
    for name, i in MEDMNIST.items():
        have = [str(s) for s in i.sizes if (root / i.filename(s)).exists()]
        n = i.n_samples
        t.add_row(name, f"{i.dims}D", i.task, str(i.n_classes), str(i.n_channels),
                  f"{n['train']}/{n['val']}/{n['test']}", "28-224" if i.dims == 2 else "28,64", ",".join(have) or "-")
    console.print(t)


@app.command()
def info(name: str, size: int = typer.Option(28, "--size", help="28, 64, 128 or 224 (3D: 28 or 64)")) -> None:
    """Describe one dataset; if present, verify its MD5 and count its labels per split."""
    import numpy as np

    from medlens.data.catalog import get_info
    from medlens.data.medmnist import load_medmnist, medmnist_path

    i = get_info(name)
    t = Table(title=i.name, show_header=False)
    t.add_row("description", i.description)
    t.add_row("task", i.task)
    t.add_row("labels", ", ".join(f"{k}: {v}" for k, v in enumerate(i.labels)))
    t.add_row("file", f"{i.filename(size)} (MD5 {i.md5.get(size, '?')})")
    t.add_row("url", i.url(size))
    t.add_row("licence", i.license)
    path = medmnist_path(name, size)
    if path.exists():
        data = load_medmnist(name, size)
        t.add_row("MD5", "[green]verified[/]")
        for s in ("train", "val", "test"):
            ds = data.get(s)
            t.add_row(s, f"{len(ds)} images {(ds.in_channels, *ds.image_shape)}, per class "
                         f"{np.asarray(ds.class_counts()).astype(int).tolist()}")
    else:
        t.add_row("on disk", f"[yellow]no[/]: `medlens data fetch {i.name} --size {size}`")
    console.print(t)


@app.command()
def fetch(name: str, size: int = typer.Option(28, "--size", help="28, 64, 128 or 224 (3D: 28 or 64)")) -> None:
    """Download a MedMNIST file from Zenodo (resumes a partial download; checks the MD5)."""
    from medlens.data.catalog import get_info
    from medlens.data.medmnist import fetch as do_fetch

    i = get_info(name)
    with progress(download=True) as bar:
        task = bar.add_task(f"{i.filename(size)}", total=None)
        path = do_fetch(name, size, progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"[green]ok[/] {path} (MD5 verified)")


@app.command()
def samples(out: Path = typer.Argument(..., help="new or empty folder for the sample files")) -> None:
    """Write a few real example files from $MEDLENS_DATA (X-ray PNGs, a DICOM slice and series, fundus photos,
    NIfTI volumes with masks): the files the README's commands name."""
    from medlens.data.samples import write_samples

    made = write_samples(out)
    t = Table(title=f"samples in {out}")
    t.add_column("file", no_wrap=True, style="bold")
    t.add_column("what")
    for name, what in made.items():
        t.add_row(name, what)
    console.print(t)


@app.command()
def prepare(config: Path = typer.Argument(..., help="experiment YAML whose image files to prepare"),
            workers: Optional[int] = typer.Option(None, "--workers", min=1, max=64,
                                                  help="worker processes (default data.workers, else "
                                                       "min(2, CPU count))"),
            set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. data.size=64")) -> None:
    """Read and prepare the config's image files once, in parallel, into the prepared store that train, evaluate,
    export, explain and the others read (medlens.data.store; the folder: data.store, else $MEDLENS_CACHE)."""
    from medlens.config import load_config
    from medlens.transforms.preprocess import prepare_store_for

    cfg = load_config(config, list(set_))
    with progress_step("preparing") as report:
        results = prepare_store_for(cfg.data, seed=cfg.seed, workers=workers, progress=report)
    if not results:
        console.print(f"nothing to prepare: the '{cfg.data.source}' source reads no image files")
        return
    built, reused = sum(r.built for r in results), sum(r.reused for r in results)
    folders = sorted({str(r.folder) for r in results})
    console.print(f"prepared store {', '.join(folders)}: {built} image(s) prepared, {reused} reused")
