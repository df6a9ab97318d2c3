"""``medlens models list``."""

from __future__ import annotations

import typer
from rich.table import Table

from medlens.cli.common import console

app = typer.Typer(help="The model registry.", no_args_is_help=True)


@app.command("list")
def list_(pattern: str = typer.Argument("*", help="wildcard filter, e.g. 'resnet*'")) -> None:
    """Registered architectures with their dimensions and options."""
    from medlens.models import list_models

    t = Table(title="medlens models")
    t.add_column("name", no_wrap=True, style="bold")
    t.add_column("dims", no_wrap=True)
    t.add_column("options")
    t.add_column("description", ratio=1)
    for e in list_models(pattern):
        t.add_row(e.name, "/".join(f"{d}D" for d in e.dims),
                  ", ".join(p for p in e.params if p not in ("in_channels", "num_outputs", "spatial_dims",
                                                               "input_size")), e.summary)
    import fnmatch

    from medlens.engine.classical import CLASSICAL_MODELS

    for name, summary in CLASSICAL_MODELS.items():
        if fnmatch.fnmatch(name, pattern):
            t.add_row(name, "2D/3D", "n_estimators / C, class_weight", summary)
    console.print(t)
