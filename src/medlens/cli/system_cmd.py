"""``medlens doctor``: the environment at a glance."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

from rich.table import Table

from medlens.cli.common import console


def doctor() -> None:
    """Versions, threads, accelerator, data directory and which datasets are present."""
    import torch

    from medlens import __version__
    from medlens.data.catalog import MEDMNIST
    from medlens.utils import DATA_ENV, data_dir

    t = Table(title="medlens doctor", show_header=False)
    t.add_row("medlens", __version__)
    t.add_row("python", platform.python_version())
    for pkg in ("torch", "lightning", "monai", "torchio", "SimpleITK", "pydicom", "highdicom", "captum",
                "scikit-learn", "numpy"):
        try:
            t.add_row(pkg, md.version(pkg))
        except md.PackageNotFoundError:
            t.add_row(pkg, "[red]not installed[/]")
    t.add_row("threads", f"{torch.get_num_threads()} torch / {os.cpu_count()} cpus")
    acc = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "none (CPU)"
    t.add_row("accelerator", acc)
    bf16 = "yes" if "amx_bf16" in _cpu_flags() or "avx512_bf16" in _cpu_flags() else "no (bf16 emulated, slower)"
    t.add_row("CPU bf16", bf16)
    root = data_dir()
    t.add_row("data directory", f"{root} ({'$' + DATA_ENV if os.environ.get(DATA_ENV) else 'default'})"
              + ("" if root.exists() else " [red]missing[/]"))
    console.print(t)
    d = Table(title="datasets present")
    d.add_column("dataset")
    d.add_column("files")
    mm = root / "medmnist"
    for name, info in MEDMNIST.items():
        have = [str(s) for s in info.sizes if (mm / info.filename(s)).exists()]
        if have:
            d.add_row(f"medmnist/{name}", ", ".join(f"{s} px" for s in have))
    for folder, desc in (("lidc-idri-0001", "LIDC-IDRI DICOM series + XML"), ("luna16", "LUNA16 MHD/RAW + CSV"),
                         ("chasedb1", "CHASE_DB1 fundus + vessel masks"), ("mri-seg", "MRI volumes + masks")):
        if (root / folder).exists():
            d.add_row(folder, desc)
    if not d.row_count:
        d.add_row("[red]none[/]", f"run `medlens data fetch NAME` or set {DATA_ENV}")
    console.print(d)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""
