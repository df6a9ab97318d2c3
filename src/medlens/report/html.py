"""Self-contained HTML report for a run folder (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from medlens import __version__
from medlens.errors import MedlensError
from medlens.utils import write_text_atomic

PRETTY = {"auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity (recall)", "specificity": "specificity",
          "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "balanced_accuracy": "balanced accuracy",
          "medmnist_acc": "ACC (MedMNIST evaluator)", "macro_f1": "macro F1", "qwk": "quadratic-weighted kappa",
          "mae": "mean absolute grade error", "dice": "Dice", "iou": "IoU (Jaccard)", "precision": "precision",
          "hd95": "HD95", "msd": "mean surface distance", "cldice": "clDice (centre-line)"}
FIGURES = [("training_curves.png", "Training curves", 760), ("roc.png", "ROC", 420),
           ("confusion_matrix.png", "Confusion matrix", 420), ("gallery_fp.png", "False positives", 520),
           ("gallery_fn.png", "False negatives", 520)]


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(run_dir: str | Path, extra_sections: list[dict] | None = None) -> Path:
    """Render ``report.html`` from a run folder's ``run.json``, ``metrics.json`` and ``plots/``."""
    run = Path(run_dir)
    try:
        meta = json.loads((run / "run.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
    except FileNotFoundError as e:
        raise MedlensError(f"cannot report: {Path(e.filename).name} missing (evaluate the run first)", run) from None
    split = metrics.get("evaluated_split", "test")
    test, val = metrics[split]["metrics"], metrics["val"]["metrics"]
    unit = f" ({metrics['distance_unit']})" if "distance_unit" in metrics else ""
    rows = [{"name": PRETTY.get(k, k) + (unit if k in ("hd95", "msd") else ""), "value": _fmt(v["value"]),
             "ci": f"{_fmt(v['ci_low'])} - {_fmt(v['ci_high'])}",
             "val": _fmt(val.get(k, {}).get("value"))} for k, v in test.items()]
    figs = [{"caption": cap, "data": _b64(run / "plots" / f), "width": w}
            for f, cap, w in FIGURES if (run / "plots" / f).exists()]
    sections = list(extra_sections or [])
    for extra in sorted((run / "report_sections").glob("*.json")) if (run / "report_sections").exists() else []:
        sections.append(json.loads(extra.read_text()))
    env = Environment(loader=PackageLoader("medlens.report", "templates"), autoescape=select_autoescape(["html"]))
    from markupsafe import Markup

    for s in sections:
        s["html"] = Markup(s["html"])
    html = env.get_template("report.html").render(
        name=run.name, version=__version__, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        task=meta["task"], model=meta["model"], dataset=meta.get("dataset"), class_names=meta["class_names"],
        split_method=meta.get("split_method", ""), n_samples=meta.get("n_samples", {}),
        in_channels=meta["in_channels"], input_size=meta["input_size"], spatial_dims=meta["spatial_dims"],
        epochs_run=meta.get("epochs_run", "?"), train_seconds=meta.get("train_seconds", "?"),
        threshold=metrics.get("threshold"), split=split, metric_rows=rows,
        n_bootstrap=metrics[split].get("n_bootstrap", 0), confusion=metrics[split].get("confusion_matrix"),
        medmnist_note="" if meta["task"] == "segmentation" else
        "'ACC (MedMNIST evaluator)' thresholds at 0.5 / argmax, as the MedMNIST paper does; the other "
        "binary metrics use the validation-chosen threshold.",
        ci_unit="patients (means over cases)" if meta["task"] == "segmentation" else "cases",
        figures=figs, extra_sections=sections, patient_level="patient" in meta.get("split_method", ""),
        config=(run / "config.yaml").read_text() if (run / "config.yaml").exists() else "")
    return write_text_atomic(run / "report.html", html)
