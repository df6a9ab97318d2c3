"""Self-contained HTML report for a run folder (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path

import warnings

from jinja2 import Environment, PackageLoader

from medlens import __version__
from medlens.data.splits import PER_IMAGE
from medlens.errors import MedlensError, MedlensWarning
from medlens.run import Run
from medlens.run.sections import read_sections
from medlens.tasks import get_task
from medlens.report.checklist import checklist, model_card, model_card_markdown
from medlens.utils import write_json_atomic, write_text_atomic

PRETTY = {"auc": "AUC", "accuracy": "accuracy", "sensitivity": "sensitivity (recall)", "specificity": "specificity",
          "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "balanced_accuracy": "balanced accuracy",
          "medmnist_acc": "ACC (MedMNIST evaluator)", "macro_f1": "macro F1", "qwk": "quadratic-weighted kappa",
          "mae": "mean absolute error", "rmse": "root mean squared error", "r2": "R² (coefficient of determination)",
          "macro_sensitivity": "macro sensitivity", "macro_specificity": "macro specificity", "dice": "Dice", "iou": "IoU (Jaccard)", "precision": "precision",
          "hd95": "HD95", "msd": "mean surface distance", "cldice": "clDice (centre-line)"}
FIGURES = [("training_curves.png", "Training curves", 760), ("roc.png", "ROC", 420),
           ("predicted_vs_true.png", "Predicted against true value (prediction interval from validation)", 460),
           ("confusion_matrix.png", "Confusion matrix", 420), ("gallery_tp.png", "True positives", 520),
           ("gallery_tn.png", "True negatives", 520), ("gallery_fp.png", "False positives", 520),
           ("gallery_fn.png", "False negatives", 520)]


def metric_name(key: str) -> str:
    """How the report names a metric (its key when it has no pretty name)."""
    return PRETTY.get(key, key)


def calibration_warning(metrics: dict) -> dict | None:
    """The evaluated split's ECE before and after scaling when the scaling made it worse (issue 26), else None."""
    cal = metrics.get("calibration") or {}
    split = metrics.get("evaluated_split", "test")
    t = cal.get(split) or {}
    if not cal.get("method") or "after" not in t:
        return None
    before, after = t["before"]["ece"]["value"], t["after"]["ece"]["value"]
    return ({"method": cal["method"], "split": split, "before": before, "after": after,
             "fitted_on": cal.get("fitted_on")} if after > before else None)


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def format_number(v, digits: int = 3) -> str:
    """Numbers for the templates; anything else (a hand-edited section) is shown as n/a."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if v != v else f"{v:.{digits}f}"


def write_report(run: Run | str | Path) -> Path:
    """Render ``report.html`` from a run folder: ``run.json``, ``metrics.json``, ``plots/`` and the
    section data in ``report_sections/``. Everything goes through autoescaping templates."""
    run = run if isinstance(run, Run) else Run.open(run)
    meta, folder = run.meta, run.dir
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except FileNotFoundError:
        raise MedlensError("cannot report: metrics.json missing (evaluate the run first)", folder) from None
    split = metrics.get("evaluated_split", "test")
    test, val = metrics[split]["metrics"], metrics["val"]["metrics"]
    unit = f" ({metrics['distance_unit']})" if "distance_unit" in metrics else ""
    rows = [{"name": metric_name(k) + (unit if k in ("hd95", "msd") else ""), "value": _fmt(v["value"]),
             "ci": f"{_fmt(v['ci_low'])} - {_fmt(v['ci_high'])}",
             "val": _fmt(val.get(k, {}).get("value"))} for k, v in test.items()]
    figs = [{"caption": cap, "data": _b64(folder / "plots" / f), "width": w}
            for f, cap, w in FIGURES if (folder / "plots" / f).exists()]
    sections, skipped = read_sections(folder)
    if skipped:
        warnings.warn(f"{folder}: report sections skipped: {', '.join(skipped)}", MedlensWarning, stacklevel=2)
    env = Environment(loader=PackageLoader("medlens.report", "templates"), autoescape=True)
    env.globals["num"] = format_number
    is_seg = get_task(meta.task).dense
    items = checklist(run, metrics, {sec["kind"] for sec in sections})
    write_json_atomic(folder / "checklist.json", items)
    card = model_card(run, metrics)
    write_text_atomic(folder / "model_card.md", model_card_markdown(card, run.name))
    plot = lambda f: _b64(folder / "plots" / f) if (folder / "plots" / f).exists() else None  # noqa: E731
    html = env.get_template("report.html").render(
        published=run.config.evaluation.published, test_metrics=test, pretty=PRETTY,
        checklist=items, card=card, recalibrated=meta.recalibrated_on, calibration=metrics.get("calibration"), shift=metrics.get("shift"),
        calibration_worse=calibration_warning(metrics), calibration_choice=meta.calibration_choice,
        decision=metrics.get("decision_curve"), subgroups=metrics.get("subgroups"),
        reliability_png=plot("reliability.png"), shift_tolerance=run.config.evaluation.shift_tolerance, dca_png=plot("decision_curve.png"),
        name=run.config.name or run.name, version=__version__, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        task=str(meta.task), dense=is_seg, model=meta.model, dataset=meta.dataset, class_names=meta.class_names,
        split_method=meta.split_method, n_samples=meta.n_samples,
        in_channels=meta.in_channels, input_size=meta.input_size, spatial_dims=meta.spatial_dims,
        epochs_run=meta.epochs_run if meta.epochs_run is not None else "?",
        train_seconds=meta.train_seconds if meta.train_seconds is not None else "?",
        threshold=meta.threshold, split=split, metric_rows=rows, label_thresholds=meta.label_thresholds,
        interval=meta.interval, interval_test=metrics[split].get("interval"),
        n_bootstrap=metrics[split].get("n_bootstrap", 0), confusion=metrics[split].get("confusion_matrix"),
        medmnist_note="" if is_seg else
        "'ACC (MedMNIST evaluator)' thresholds at 0.5 / argmax, as the MedMNIST paper does; the other "
        "binary metrics use the validation-chosen threshold.",
        ci_unit="patients (means over cases)" if is_seg else "cases",
        # the split keeps patients apart only when the data named them (run.json's patients_known)
        figures=figs, extra_sections=sections, patient_level=meta.patients_known is True,
        per_image=meta.patients_known is False, per_image_text=PER_IMAGE, positive_class=meta.positive_class,
        config=(folder / "config.yaml").read_text() if (folder / "config.yaml").exists() else "")
    return write_text_atomic(folder / "report.html", html)
