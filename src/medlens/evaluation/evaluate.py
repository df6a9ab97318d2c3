"""Evaluate a run folder: predictions, threshold from validation, metrics with CIs, calibration, decision
curve, validation-to-test shift, subgroups and plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from medlens.data.folder import manifest_columns
from medlens.errors import MedlensError
from medlens.evaluation import plots
from medlens.evaluation.calibration import calibration_with_ci, reliability_bins
from medlens.evaluation.decision import decision_curve
from medlens.evaluation.intervals import interval_coverage
from medlens.evaluation.metrics import compute_metrics
from medlens.evaluation.shift import shift_report
from medlens.evaluation.subgroups import subgroup_metrics
from medlens.run import Predictor, Run
from medlens.tasks import Task, get_task
from medlens.transforms.preprocess import prepared_data
from medlens.utils import atomic_path, write_json_atomic


def evaluate_run(run: Run | str | Path, split: str = "test", data=None, predictor: Predictor | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` and ``plots/`` for a trained classifier run.

    The binary decision threshold is the run's, chosen on the validation split when it was trained
    (``RunMeta.threshold``); test labels never influence it. ``progress(done, total, "loading")`` follows the
    loading of the data when ``data`` is not given.
    """
    run = run if isinstance(run, Run) else Run.open(run, expect="classification")
    predictor = predictor or Predictor(run)
    meta, cfg = run.meta, run.config
    if data is None:
        data = prepared_data(cfg.data, seed=cfg.seed,
                             progress=(lambda k, n: progress(k, n, "loading")) if progress else None)
    task, names = run.task_type, meta.class_names
    threshold = None
    if task.has_threshold:
        if meta.threshold is None:
            raise MedlensError("the run records no validation threshold (it did not finish training)", run.dir)
        threshold = meta.threshold.value
    # issue 26: multi-label runs decide each label at its validation threshold
    label_t = meta.label_thresholds if task.label_thresholds else None
    metric_t = label_t if label_t else threshold
    column_t = np.array([label_t[n] for n in names]) if label_t else threshold
    cal = meta.calibration
    ev = cfg.evaluation

    def probs(ds):  # (calibrated, raw): the model runs once
        raw = predictor.predict_dataset(ds, calibrated=False)
        return (cal.apply(raw) if cal is not None else raw), raw

    val = data.val
    p_val, raw_val = probs(val)
    results = {"task": task.name, "class_names": names, "dataset": meta.dataset,
               "split_method": meta.split_method, "evaluated_split": split,
               "calibrated": cal.method if cal else None,
               "val": compute_metrics(task, val.labels, p_val, metric_t, ev.bootstrap, ev.ci, cfg.seed, raw=raw_val)}
    if task.has_threshold and meta.threshold is not None:  # (checked above: a thresholded task has one)
        results["threshold"] = meta.threshold.model_dump()  # a copy for the reader; the run holds it
    pred_frames = [_pred_frame("val", val, p_val, task, column_t, names, meta.interval)]
    if split != "val":
        ds = data.get(split)
        p, raw = probs(ds)
        results[split] = compute_metrics(task, ds.labels, p, metric_t, ev.bootstrap, ev.ci, cfg.seed, raw=raw)
        pred_frames.append(_pred_frame(split, ds, p, task, column_t, names, meta.interval))
    else:
        ds, p, raw = val, p_val, raw_val
    pdir = run.dir / "plots"
    if meta.interval is not None:  # issue 26: how often the validation-fitted interval covers the true value
        results[split]["interval"] = {**meta.interval.model_dump(mode="json"),
                                      "coverage_observed": interval_coverage(ds.labels, p, meta.interval.half_width)}
    if task.exclusive:  # calibration, decision curve, shift and subgroups read one class per case
        results.update(_clinical(run, ds, p, raw, val, p_val, raw_val, split, threshold, pdir))
    write_json_atomic(run.dir / "metrics.json", results)
    with atomic_path(run.dir / "predictions.csv") as tmp:
        pd.concat(pred_frames).to_csv(tmp, index=False)
    plots.plot_history(run.dir / "history.csv", pdir / "training_curves.png")
    if task.numeric:  # issue 26: a number has no ROC; predictions against the truth, the interval as a band
        plots.plot_predicted_vs_true(ds.labels, p, pdir / "predicted_vs_true.png",
                                     meta.interval.half_width if meta.interval else None, names[0],
                                     title=f"Predicted vs true ({split})")
    else:
        plots.plot_roc(task, ds.labels, p, names, pdir / "roc.png", threshold, title=f"ROC ({split})")
    if task.has_threshold:  # all four outcome galleries, as the LUNA16 seed system shows them
        y = ds.labels
        for kind, sel, what in (("tp", (y == 1) & (p >= threshold), "true positives"),
                                ("tn", (y == 0) & (p < threshold), "true negatives"),
                                ("fp", (y == 0) & (p >= threshold), "false positives"),
                                ("fn", (y == 1) & (p < threshold), "false negatives")):
            idx = np.flatnonzero(sel)
            idx = idx[np.argsort(-p[idx] if kind in ("tp", "fp") else p[idx])][:16]
            out = pdir / f"gallery_{kind}.png"
            if len(idx):
                x, _ = ds.batch(np.sort(idx))
                imgs = x.numpy()[:, 0]
                if imgs.ndim == 4:  # 3D: the middle axial slice
                    imgs = imgs[:, imgs.shape[1] // 2]
                plots.grid_png(imgs, out, f"{what} ({split}, {int(sel.sum())} in all; most confident first)")
            elif out.exists():
                out.unlink()
    if "confusion_matrix" in results[split]:
        plots.plot_confusion(results[split]["confusion_matrix"], names, pdir / "confusion_matrix.png",
                             title=f"Confusion matrix ({split})")
    return results


def _clinical(run: Run, ds, p, raw, val, p_val, raw_val, split: str, threshold, pdir: Path) -> dict:
    """Calibration (before and after scaling), decision curve, validation-to-test shift and subgroups."""
    cfg, meta = run.config, run.meta
    ev, cal = cfg.evaluation, meta.calibration
    nb = ev.calibration_bins
    out: dict = {}
    calib: dict = {"method": cal.method if cal else None, "params": cal.params if cal else None,
                   "fitted_on": cal.fitted_on if cal else None, "n_bins": nb}
    for name, y, pc, pr in (("val", val.labels, p_val, raw_val), (split, ds.labels, p, raw)):
        calib[name] = {"before": calibration_with_ci(y, pr, nb, ev.bootstrap, ev.ci, cfg.seed)}
        if cal is not None:
            calib[name]["after"] = calibration_with_ci(y, pc, nb, ev.bootstrap, ev.ci, cfg.seed)
    curves = {"before scaling" if cal else "model": reliability_bins(ds.labels, raw, nb)}
    if cal is not None:
        curves[f"after {cal.method} scaling"] = reliability_bins(ds.labels, pc, nb)
    plots.plot_reliability(curves, pdir / "reliability.png", f"Reliability ({split})")
    out["calibration"] = calib
    if run.task_type.has_threshold:  # net benefit at the threshold probabilities of a yes/no decision
        lo, hi = ev.decision_curve
        out["decision_curve"] = decision_curve(ds.labels, p, lo, hi)
        plots.plot_decision_curve(out["decision_curve"], pdir / "decision_curve.png", f"Decision curve ({split})")
    if split != "val":
        out["shift"] = shift_report(meta.task, meta.class_names, val.labels, p_val, ds.labels, p, threshold,
                                    ev.shift_tolerance, split, meta.threshold.chosen_on if meta.threshold else "val")
    if ev.subgroups:
        d = cfg.data
        manifest = d.resolved_path()
        if manifest is None:  # the config allows subgroups only for a CSV manifest, which has a path
            raise MedlensError("evaluation.subgroups needs the CSV manifest (data.path)", run.dir / "config.yaml")
        attrs = manifest_columns(manifest, ev.subgroups, image_root=d.resolved_image_root(),
                                 path_column=d.path_column, suffix=d.suffix, allow_outside_root=d.allow_outside_root)
        groups = {c: np.array([attrs.get(str(s), {}).get(c, "(not in manifest)") for s in ds.sources])
                  for c in ev.subgroups}
        out["subgroups"] = subgroup_metrics(meta.task, ds.labels, p, threshold, groups, ev.bootstrap, ev.ci,
                                            cfg.seed, ev.min_subgroup)
    return out


def _pred_frame(split: str, ds, prob: np.ndarray, task: str | Task, threshold, names,
                interval=None) -> pd.DataFrame:
    df = pd.DataFrame({"split": split, "index": np.arange(len(ds)), "source": ds.sources,
                       "patient_id": ds.patient_ids})
    for col, values in get_task(task).prediction_columns(ds.labels, prob, threshold, names).items():
        df[col] = values
    if interval is not None:  # issue 26: a regression's prediction interval around each value
        df["lower"], df["upper"] = prob - interval.half_width, prob + interval.half_width
    return df
