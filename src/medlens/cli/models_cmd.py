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
    for col in ("name", "dims", "task", "options", "description"):
        t.add_column(col)
    for e in list_models(pattern):
        t.add_row(e.name, "/".join(f"{d}D" for d in e.dims), e.task,
                  ", ".join(p for p in e.params if p not in ("in_channels", "num_outputs", "spatial_dims",
                                                               "input_size")), e.summary)
    console.print(t)
