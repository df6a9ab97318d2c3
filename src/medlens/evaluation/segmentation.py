"""Evaluate a segmentation run: masks, overlays, metrics with patient-bootstrap CIs, the report section's data.

The foreground threshold is chosen on the validation cases (best mean Dice) and only then applied to
the test cases. Test metrics are means over cases with patient-level bootstrap CIs; where a second
observer's masks exist, the same metrics of that observer against the reference are reported beside
the model's (the human level).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from scipy import ndimage

from medlens.evaluation import plots
from medlens.evaluation.segmetrics import case_metrics, summarize
from medlens.io.writers import save
from medlens.run import Predictor, Run
from medlens.run.sections import write_section
from medlens.transforms.preprocess import prepared_segmentation
from medlens.utils import atomic_path, write_json_atomic

PRETTY = {"dice": "Dice", "iou": "IoU (Jaccard)", "sensitivity": "sensitivity", "precision": "precision",
          "hd95": "HD95", "msd": "mean surface distance", "cldice": "clDice (centre-line)"}


def _pretty(metric: str) -> str:
    return PRETTY.get(metric, metric)


def label_values_out(meta, mask: np.ndarray, fmt_png: bool) -> np.ndarray:
    """Class indices -> the values written to disk: the configured label values, else 255 (PNG) / 1."""
    lv = meta.label_values
    if lv:
        return np.asarray(lv)[mask].astype(np.uint16 if max(lv) > 255 else np.uint8)
    if len(meta.class_names) == 2:
        return (mask > 0).astype(np.uint8) * (255 if fmt_png else 1)
    return mask.astype(np.uint8)


def write_mask(mask: np.ndarray, geometry, path: Path, meta) -> Path:
    """Write a label map in its image's geometry: PNG for 2D pictures, NIfTI (or the given suffix) for volumes."""
    png = path.suffix.lower() == ".png"
    written = save(geometry.with_array(label_values_out(meta, mask, png), is_rgb=False), path)
    assert isinstance(written, Path)  # a file name with a suffix (mask_name) is one file, not a DICOM series
    return written


def mask_name(stem: str, spatial_dims: int) -> str:
    return f"{stem}_mask.png" if spatial_dims == 2 else f"{stem}_mask.nii.gz"


def overlay_rgb(display: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB: the image with the prediction filled in translucent red and outlined in red, the
    reference outlined in green (2D; for volumes use ``overlay_planes``)."""
    base = display if display.ndim == 3 else np.repeat(display[..., None], 3, -1)
    out = base.astype(np.float32)
    p = pred > 0
    out[p] = 0.6 * out[p] + 0.4 * np.array([255, 40, 40])
    if ref is not None:
        r = ref > 0
        out[r & ~np.asarray(ndimage.binary_erosion(r), bool)] = (40, 220, 40)
    out[p & ~np.asarray(ndimage.binary_erosion(p), bool)] = (255, 30, 30)
    return out.clip(0, 255).astype(np.uint8)


def overlay_planes(display: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Volumes: axial, coronal and sagittal planes through the centre of the (predicted or reference)
    foreground, side by side."""
    fg = (pred > 0) | (ref > 0 if ref is not None else False)
    c = np.round(np.argwhere(fg).mean(0)).astype(int) if fg.any() else np.array(display.shape) // 2
    views = []
    for axis in range(3):
        take = lambda a: np.take(a, c[axis], axis=axis)  # noqa: E731
        v = overlay_rgb(take(display), take(pred), take(ref) if ref is not None else None)
        views.append(v if axis == 0 else v[::-1])
    h = max(v.shape[0] for v in views)
    views = [np.pad(v, ((0, h - v.shape[0]), (0, 4), (0, 0))) for v in views]
    return np.concatenate(views, axis=1)


def write_overlay(display, pred, ref, path: Path) -> Path:
    rgb = overlay_rgb(display, pred, ref) if pred.ndim == 2 else overlay_planes(display, pred, ref)
    with atomic_path(path) as tmp:
        PILImage.fromarray(rgb).save(tmp, format="PNG")
    return path


def _case_scores(pred, ref, spacing, with_cldice: bool, n_classes: int) -> dict:
    """Metrics of one case: the foreground for two classes, else the mean over foreground classes."""
    if n_classes == 2:
        return case_metrics(pred > 0, ref > 0, spacing, with_cldice)
    per = [case_metrics(pred == k, ref == k, spacing, with_cldice) for k in range(1, n_classes)]
    return {k: float(np.nanmean([p[k] for p in per])) if any(np.isfinite(p[k]) for p in per) else float("nan")
            for k in per[0]}


def _spacing(case, meta) -> tuple | None:
    """The case's spacing in mm where it is known (volumes, or 2D with ``data.pixel_spacing``), else None (px)."""
    if case.image.ndim - 1 == 3 or meta.preprocessing.pixel_spacing:
        return case.spacing
    return None


def evaluate_segmentation_run(run: Run | str | Path, split: str = "test", data=None,
                              predictor: Predictor | None = None,
                              progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Predict the validation and ``split`` cases; write ``metrics.json``, ``per_case.csv``,
    ``predictions/`` (masks and overlays), ``plots/training_curves.png`` and the report section.
    ``progress(done, total, what)`` follows the loading of the cases ("loading") and then the cases predicted
    and scored ("predicting", out of the validation and ``split`` cases together)."""
    run = run if isinstance(run, Run) else Run.open(run, expect="segmentation")
    predictor = predictor or Predictor(run)
    meta, cfg, folder = run.meta, run.config, run.dir
    if data is None:
        data = prepared_segmentation(cfg.data, cfg.segmentation, seed=cfg.seed,
                                     progress=(lambda k, n: progress(k, n, "loading")) if progress else None)
    n_cls = len(meta.class_names)
    with_cl = bool(cfg.segmentation.cldice)
    ev = cfg.evaluation
    pred_dir = folder / "predictions"
    pred_dir.mkdir(exist_ok=True)
    threshold = meta.threshold.value if meta.threshold else None
    results = {"task": "segmentation", "class_names": meta.class_names, "dataset": meta.dataset,
               "split_method": meta.split_method, "evaluated_split": split,
               "threshold": meta.threshold.model_dump() if meta.threshold else None,
               "distance_unit": "mm" if data.test and _spacing(data.test[0], meta) else "px"}
    rows, ref_rows = [], []
    chosen = ("val", split) if split != "val" else ("val",)
    n_cases, done = sum(len(data.get(sp)) for sp in chosen), 0
    if progress:
        progress(0, n_cases, "predicting")
    for sp in chosen:
        cases = data.get(sp)
        split_rows = []
        for c in cases:
            t0 = time.perf_counter()
            pred = predictor.labels(predictor.segment_probs(c.image, c.case_id))
            secs = time.perf_counter() - t0
            m = _case_scores(pred, c.mask, _spacing(c, meta), with_cl, n_cls)
            split_rows.append({"split": sp, "case": c.case_id, "patient_id": c.patient_id, "seconds": secs, **m})
            if sp == split:
                write_mask(pred, c.geometry, pred_dir / mask_name(c.case_id, c.image.ndim - 1), meta)
                write_overlay(c.display, pred, c.mask, pred_dir / f"{c.case_id}_overlay.png")
                if c.reference is not None:
                    r = _case_scores(c.reference, c.mask, _spacing(c, meta), with_cl, n_cls)
                    ref_rows.append({"case": c.case_id, "patient_id": c.patient_id, **r})
            done += 1
            if progress:
                progress(done, n_cases, "predicting")
        groups = [r["patient_id"] for r in split_rows]
        results[sp] = {"metrics": summarize(split_rows, groups, ev.bootstrap, ev.ci, cfg.seed),
                       "n_bootstrap": ev.bootstrap, "n": len(split_rows), "n_patients": len(set(groups))}
        rows += split_rows
    if ref_rows:
        results["reference_observer"] = {
            "metrics": summarize(ref_rows, [r["patient_id"] for r in ref_rows], ev.bootstrap, ev.ci, cfg.seed),
            "what": "second observer against the reference masks, same cases"}
    write_json_atomic(folder / "metrics.json", results)
    with atomic_path(folder / "per_case.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    plots.plot_history(folder / "history.csv", folder / "plots" / "training_curves.png")
    write_segmentation_section(folder, results, rows, split, threshold)
    return results


def write_segmentation_section(folder: Path, results: dict, rows: list[dict], split: str,
                               threshold: float | None) -> Path:
    """The segmentation section's data: the model beside the human observer, per-case table, overlays."""
    unit = results["distance_unit"]
    ref = results.get("reference_observer", {}).get("metrics", {})
    metrics = [{"name": _pretty(k) + (f" ({unit})" if k in ("hd95", "msd") else ""), **v,
                "ref": ref.get(k)} for k, v in results[split]["metrics"].items()]
    per = [r for r in rows if r["split"] == split]
    cols = [{"key": k, "title": PRETTY.get(k, k)} for k in ("dice", "iou", "sensitivity", "precision", "hd95", "msd",
                                                             "cldice") if per and k in per[0]]
    figs = []
    for r in sorted(per, key=lambda r: r["dice"])[:4]:
        p = folder / "predictions" / f"{r['case']}_overlay.png"
        if p.exists():
            figs.append({"case": r["case"], "dice": r["dice"], "png": base64.b64encode(p.read_bytes()).decode()})
    data = {"metrics": metrics, "has_reference": bool(ref), "split": split, "columns": cols,
            "cases": [{k: (str(v) if k in ("case", "patient_id") else v) for k, v in r.items()} for r in per],
            "figures": figs, "threshold": threshold if threshold is not None else float("nan")}
    return write_section(folder, "segmentation", "Segmentation", data)
