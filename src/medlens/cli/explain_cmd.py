"""``medlens explain``: attribution maps for files, the faithfulness table, feature views."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medlens.cli.common import console, progress


def explain(run_dir: Optional[Path] = typer.Argument(None, help="a run folder (not needed with --list)"),
            files: List[Path] = typer.Argument(None, help="images to explain"),
            method: str = typer.Option("gradcam", "--method", "-m", help="see --list"),
            target: Optional[int] = typer.Option(None, "--target", help="class index (default: predicted)"),
            layer: Optional[str] = typer.Option(None, "--layer", help="layer for CAM methods (default: last spatial block)"),
            out: Optional[Path] = typer.Option(None, "--out", help="default: RUN_DIR/explanations"),
            evaluate: bool = typer.Option(False, "--evaluate", help="faithfulness table on test images"),
            n: int = typer.Option(200, "--n", help="test images for --evaluate"),
            methods: Optional[str] = typer.Option(None, "--methods", help="comma list for --evaluate"),
            features: bool = typer.Option(False, "--features", help="also write filter and feature-map grids"),
            report: bool = typer.Option(False, "--report", help="add the explanations section to report.html"),
            list_: bool = typer.Option(False, "--list", help="list the methods")) -> None:
    """Explain a run's decisions (2D and 3D): Grad-CAM & co., gradients, occlusion, LIME/SHAP."""
    from medlens.errors import MedlensError
    from medlens.explain import METHODS

    if list_:
        _print_methods()
        return
    if run_dir is None:
        raise MedlensError("give a run folder (only --list works without one)")
    if method not in METHODS:
        raise MedlensError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    if evaluate:
        _print_faithfulness(run_dir, [m.strip() for m in methods.split(",")] if methods else None, n)
    if files:
        from medlens.explain.run import explain_files

        rows = explain_files(run_dir, [str(f) for f in files], method, target, layer, out)
        for r in rows:
            said = f"value={r['value']:.4g}" if "value" in r else f"p={r['probability']:.3f}"
            console.print(f"{Path(r['file']).name}: {method} for '{r['target']}' ({said}) -> {r['png']}")
        if features:
            _write_features(run_dir, files[0], (out or run_dir / "explanations") / "features")
    if report:
        from medlens.explain.run import write_report_section
        from medlens.report.html import write_report

        write_report_section(run_dir, method)
        console.print(f"report: {write_report(run_dir)}")
    if not files and not evaluate and not report:
        raise MedlensError("give image files to explain, or --evaluate, --report or --list")


def _print_methods() -> None:
    """``--list``: every attribution method with its dimensions and whether it takes a layer."""
    from medlens.explain import METHODS

    t = Table(title="explanation methods")
    for c in ("method", "dims", "layer", "description"):
        t.add_column(c, no_wrap=c == "method")
    for m in METHODS.values():
        t.add_row(m.name, "/".join(f"{d}D" for d in m.dims), "yes" if m.uses_layer else "", m.summary)
    console.print(t)


def _print_faithfulness(run_dir: Path, chosen: list[str] | None, n: int) -> None:
    """``--evaluate``: deletion/insertion against random and the model-randomisation check, per method."""
    from medlens.explain import METHODS
    from medlens.explain.run import evaluate_faithfulness

    with progress() as bar:
        task = bar.add_task("explaining", total=len(chosen or METHODS))
        rows = evaluate_faithfulness(run_dir, chosen, n=n, progress=lambda k, tot, m: bar.update(
            task, completed=k, description=m))
    t = Table(title=f"faithfulness on {rows[0]['n'] if rows else 0} test images "
                    "(deletion: lower is better, insertion: higher is better)")
    for c in ("method", "deletion", "random", "insertion", "random ", "beats random",
              "rand. model Spearman", "rand. model SSIM", "s/image"):
        t.add_column(c, justify="right" if c != "method" else "left")
    for r in rows:
        t.add_row(r["method"], f"{r['deletion_auc']:.3f}", f"{r['random_deletion_auc']:.3f}",
                  f"{r['insertion_auc']:.3f}", f"{r['random_insertion_auc']:.3f}",
                  "both" if r["beats_random_deletion"] and r["beats_random_insertion"] else
                  ("deletion" if r["beats_random_deletion"] else "insertion" if r["beats_random_insertion"]
                   else "no"),
                  f"{r['randomisation_spearman']:.2f}", f"{r['randomisation_ssim']:.2f}",
                  f"{r['seconds_per_image']:.4f}")
    console.print(t)


def _write_features(run_dir: Path, file: Path, fdir: Path) -> None:
    """``--features``: filter and feature-map grids of the run's network for one prepared input."""
    import torch

    from medlens.engine.module import ClassifierNet
    from medlens.errors import MedlensError
    from medlens.explain.features import write_feature_views
    from medlens.run import Predictor, Run

    run = Run.open(run_dir, expect="classification")
    net = run.model
    if not isinstance(net, ClassifierNet):
        raise MedlensError("--features needs a neural-network run (its filters and feature maps)", run_dir)
    x = torch.from_numpy(Predictor(run).prepare(file)[None])
    ps = write_feature_views(net.net, net.normalize(x), fdir)
    console.print(f"feature views: {len(ps)} PNG in {fdir}")
