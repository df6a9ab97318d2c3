"""``medlens plan``: fingerprint a dataset, measure this machine, write a plan (an experiment config) (issue 17)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medlens.cli.common import print_plan, quiet_libraries, say


def plan(source: str = typer.Argument(..., help="a MedMNIST-format .npz, a catalogue name (name or name@size), "
                                      "an image folder, a CSV manifest, an HDF5 patch store, or an experiment "
                                      "YAML (its data: section)"),
         budget: str = typer.Option(..., "--budget", help="wall time of the whole `medlens train --auto` run, "
                                    "e.g. 15m, 90s, 1h"),
         out: Path = typer.Option(Path("plan.yaml"), "--out", help="the plan (an experiment config)"),
         seed: int = typer.Option(0, "--seed"),
         set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. data.max_samples=300 "
                                        "(data.* before fingerprinting)"),
         output_dir: Optional[str] = typer.Option(None, "--output-dir", help="the plan's output_dir"),
         recalibrate: bool = typer.Option(False, "--recalibrate", help="measure this machine again instead of "
                                          "reusing its stored figures (machine.json under $MEDLENS_CACHE, else "
                                          "~/.cache/medlens)")) -> None:
    """Fingerprint a dataset, time candidate networks on this machine and write a plan with its reasons (the
    same data, budget and seed give the same plan: this machine's figures are measured once and reused)."""
    from medlens.workflow.plan import make_plan, write_plan

    quiet_libraries()
    sets = list(set_) + ([f"output_dir={output_dir}"] if output_dir else [])
    cfg = make_plan(source, budget, seed=seed, overrides=sets, log=say, recalibrate=recalibrate)
    print_plan(cfg, write_plan(cfg, out))
