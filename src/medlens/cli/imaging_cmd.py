"""``medlens process|register|features``: classical processing from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress_step


def process(src: Path = typer.Argument(..., help="image file or DICOM folder"),
            dst: Path = typer.Argument(..., help="output file (format from the suffix)"),
            steps: str = typer.Option(..., "--steps", help="'window:lung,denoise:nlm,...' or a YAML file")) -> None:
    """Apply a pipeline of classical steps (enhance, filter, denoise, segment, resample)."""
    from medlens.imaging.pipeline import load_steps, run_steps
    from medlens.io import load, save
    from medlens.io.writers import check_output

    plan = load_steps(steps)  # validated before any work
    check_output(dst)
    out = run_steps(load(src), plan)
    save(out, dst)
    console.print(f"[green]wrote[/] {dst} after {' -> '.join(n + (':' + a if a else '') for n, a in plan)}")


def register_images(fixed: Path = typer.Argument(..., help="fixed image"),
                    moving: Path = typer.Argument(..., help="moving image"),
                    out: Path = typer.Argument(..., help="registered moving image (on the fixed grid)"),
                    kind: str = typer.Option("rigid", "--kind", help="rigid, affine or bspline"),
                    mask: Optional[Path] = typer.Option(None, "--mask", help="a mask of the moving image to carry along"),
                    transform: Optional[Path] = typer.Option(None, "--transform", help="save the transform (.tfm)")
                    ) -> None:
    """Intensity-based registration (Mattes mutual information); the transform can be saved and applied to masks."""
    from medlens.imaging.register import register as do_register
    from medlens.io import load, save
    from medlens.io.limits import require_utf8
    from medlens.utils import smoke_mode
    from medlens.io.writers import check_output

    mout = _mask_output(out) if mask else None
    for p in (out, mout):
        if p is not None:
            check_output(p)
    if transform:
        require_utf8(transform, "transform path")  # checked before the work: SimpleITK aborts on such a path
    f, m = load(fixed), load(moving)
    with progress_step(f"registering ({kind})") as report:
        # 200 iterations per level; 20 under the README test's $MEDLENS_SMOKE (medlens.utils.smoke_mode)
        reg = do_register(f, m, kind, iterations=20 if smoke_mode() else 200, progress=report)
    save(reg.apply(m, f), out)
    console.print(f"[green]registered[/] ({kind}, Mattes MI {reg.metric:.4f}) -> {out}")
    if transform:
        console.print(f"transform -> {reg.save(transform)}")
    if mask and mout is not None:
        save(reg.apply(load(mask), f, mask=True), mout)
        console.print(f"mask -> {mout}")


def features(image: Path = typer.Argument(..., help="image file"),
             mask: Path = typer.Argument(..., help="mask on the same grid")) -> None:
    """First-order, GLCM texture and 3D shape features inside a mask."""
    from medlens.errors import ShapeError
    from medlens.imaging.features import first_order, glcm, shape
    from medlens.io import load

    img, m = load(image), load(mask)
    if img.shape != m.shape:
        raise ShapeError(f"mask grid {m.shape} differs from the image grid {img.shape}", mask)
    if not np_allclose(img.spacing, m.spacing):
        raise ShapeError(f"mask spacing {m.spacing} differs from the image spacing {img.spacing}", mask)
    t = Table(title=f"features of {image.name} in {mask.name}")
    t.add_column("feature")
    t.add_column("value", justify="right")
    feats = {**first_order(img, m.array > 0), **glcm(img, m.array > 0)}
    if img.spatial_dims == 3:
        feats.update(shape(m.with_array(m.array > 0)))
    for k, v in feats.items():
        t.add_row(k, f"{v:.6g}")
    console.print(t)


def _mask_output(out: Path) -> Path:
    """Where ``register --mask`` writes the carried mask: beside ``out``, with ``_mask`` in its name."""
    mout = out.with_name(out.name.replace(".nii", "_mask.nii").replace(".nrrd", "_mask.nrrd")
                         if "_mask" not in out.name else out.name)
    return out.with_name("mask_" + out.name) if mout == out else mout


def np_allclose(a, b) -> bool:
    import numpy as np

    return bool(np.allclose(a, b, rtol=1e-4))
