"""Evaluate a segmentation run, and segment new files with one: masks, overlays, metrics, report section.

The foreground threshold is chosen on the validation cases (best mean Dice) and only then applied to
the test cases. Test metrics are means over cases with patient-level bootstrap CIs; where a second
observer's masks exist, the same metrics of that observer against the reference are reported beside
the model's (the human level).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medlens.evaluation.segmetrics import case_metrics, summarize
from medlens.utils import atomic_path, write_json_atomic

PRETTY = {"dice": "Dice", "iou": "IoU (Jaccard)", "sensitivity": "sensitivity", "precision": "precision",
          "hd95": "HD95", "msd": "mean surface distance", "cldice": "clDice (centre-line)"}


def infer_case(net, image: np.ndarray, meta: dict, name: str = "image") -> np.ndarray:
    """Class probabilities (K, *spatial) of a prepared image with the run's inference settings."""
    from medlens.engine.segmentation import predict_probs

    s = meta["segmentation"]
    return predict_probs(net, image, s["patch_size"], s["overlap"], s["blend"], s["sw_batch_size"], s["tta"], name)


def to_labels(probs: np.ndarray, meta: dict) -> np.ndarray:
    from medlens.engine.segmentation import postprocess

    s = meta["segmentation"]
    return postprocess(probs, float(meta.get("threshold", 0.5)), s["largest_components"], s["min_size"])


def select_threshold(net, cases, meta: dict) -> tuple[float, float | None]:
    """Foreground threshold for two-class runs: the config's fixed value, or the best on validation."""
    from medlens.engine.segmentation import choose_threshold

    rule = meta["segmentation"]["threshold"]
    if len(meta["class_names"]) != 2:
        return 0.5, None
    if rule.startswith("fixed:"):
        return float(rule.split(":", 1)[1]), None
    probs = [infer_case(net, c.image, meta, c.case_id)[1] for c in cases]
    return choose_threshold(probs, [c.mask > 0 for c in cases])


def label_values_out(meta: dict, mask: np.ndarray, fmt_png: bool) -> np.ndarray:
    """Class indices -> the values written to disk: the configured label values, else 255 (PNG) / 1."""
    lv = meta.get("label_values")
    if lv:
        return np.asarray(lv)[mask].astype(np.uint16 if max(lv) > 255 else np.uint8)
    if len(meta["class_names"]) == 2:
        return (mask > 0).astype(np.uint8) * (255 if fmt_png else 1)
    return mask.astype(np.uint8)


def write_mask(mask: np.ndarray, geometry, path: Path, meta: dict) -> Path:
    """Write a label map in its image's geometry: PNG for 2D pictures, NIfTI (or the given suffix) for volumes."""
    from medlens.io.writers import save

    png = path.suffix.lower() == ".png"
    return save(geometry.with_array(label_values_out(meta, mask, png), is_rgb=False), path)


def mask_path_for(src: Path, out_dir: Path, spatial_dims: int) -> Path:
    from medlens.data.segmentation import _strip_ext

    stem = _strip_ext(src.name) if src.is_file() else src.name
    return out_dir / (f"{stem}_mask.png" if spatial_dims == 2 else f"{stem}_mask.nii.gz")


def overlay_rgb(display: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB: the image with the prediction filled in translucent red and outlined in red, the
    reference outlined in green (2D; for volumes use ``overlay_planes``)."""
    from scipy import ndimage

    base = display if display.ndim == 3 else np.repeat(display[..., None], 3, -1)
    out = base.astype(np.float32)
    p = pred > 0
    out[p] = 0.6 * out[p] + 0.4 * np.array([255, 40, 40])
    if ref is not None:
        r = ref > 0
        out[r ^ ndimage.binary_erosion(r)] = (40, 220, 40)
    out[p ^ ndimage.binary_erosion(p)] = (255, 30, 30)
    return out.clip(0, 255).astype(np.uint8)


def overlay_planes(display: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Volumes: axial, coronal and sagittal planes through the centre of the (predicted or reference)
    foreground, side by side."""
    fg = (pred > 0) | (ref > 0 if ref is not None else False)
    c = np.round(np.argwhere(fg).mean(0)).astype(int) if fg.any() else np.array(display.shape) // 2
    views = []
    for axis in range(3):
        take = lambda a: np.take(a, c[axis], axis=axis) if a is not None else None  # noqa: E731
        v = overlay_rgb(take(display), take(pred), take(ref))
        views.append(v if axis == 0 else v[::-1])
    h = max(v.shape[0] for v in views)
    views = [np.pad(v, ((0, h - v.shape[0]), (0, 4), (0, 0))) for v in views]
    return np.concatenate(views, axis=1)


def write_overlay(display, pred, ref, path: Path) -> Path:
    from PIL import Image as PILImage

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
    if case.image.ndim - 1 == 3 or meta.get("pixel_spacing"):
        return case.spacing
    return None


def evaluate_segmentation_run(run_dir: str | Path, split: str = "test", data=None, net=None) -> dict:
    """Predict the validation and ``split`` cases; write ``metrics.json``, ``per_case.csv``,
    ``predictions/`` (masks and overlays), ``plots/training_curves.png`` and the report section."""
    from medlens.config import load_config
    from medlens.data.segmentation import load_segmentation
    from medlens.engine.predict import load_run_model, read_run_meta
    from medlens.evaluation import plots

    run = Path(run_dir)
    meta = read_run_meta(run)
    cfg = load_config(run / "config.yaml")
    if net is None:
        net, meta = load_run_model(run, expect="segmentation")
    if data is None:
        data = load_segmentation(cfg.data, cfg.segmentation, seed=cfg.seed)
    n_cls = len(meta["class_names"])
    with_cl = bool(meta["segmentation"].get("cldice"))
    ev = cfg.evaluation
    pred_dir = run / "predictions"
    pred_dir.mkdir(exist_ok=True)
    results = {"task": "segmentation", "class_names": meta["class_names"], "dataset": meta.get("dataset"),
               "split_method": meta.get("split_method"), "evaluated_split": split,
               "threshold": {"rule": meta["segmentation"]["threshold"], "value": meta.get("threshold", 0.5),
                             "chosen_on": "val"},
               "distance_unit": "mm" if data.test and _spacing(data.test[0], meta) else "px"}
    rows, ref_rows = [], []
    for sp in ("val", split) if split != "val" else ("val",):
        cases = data.get(sp)
        split_rows = []
        for c in cases:
            t0 = time.perf_counter()
            probs = infer_case(net, c.image, meta, c.case_id)
            pred = to_labels(probs, meta)
            secs = time.perf_counter() - t0
            m = _case_scores(pred, c.mask, _spacing(c, meta), with_cl, n_cls)
            split_rows.append({"split": sp, "case": c.case_id, "patient_id": c.patient_id, "seconds": secs, **m})
            if sp == split:
                write_mask(pred, c.geometry, mask_path_for(c.path, pred_dir, c.image.ndim - 1), meta)
                write_overlay(c.display, pred, c.mask, pred_dir / f"{c.case_id}_overlay.png")
                if c.reference is not None:
                    r = _case_scores(c.reference, c.mask, _spacing(c, meta), with_cl, n_cls)
                    ref_rows.append({"case": c.case_id, "patient_id": c.patient_id, **r})
        groups = [r["patient_id"] for r in split_rows]
        results[sp] = {"metrics": summarize(split_rows, groups, ev.bootstrap, ev.ci, cfg.seed),
                       "n_bootstrap": ev.bootstrap, "n": len(split_rows), "n_patients": len(set(groups))}
        rows += split_rows
    if ref_rows:
        results["reference_observer"] = {
            "metrics": summarize(ref_rows, [r["patient_id"] for r in ref_rows], ev.bootstrap, ev.ci, cfg.seed),
            "what": "second observer against the reference masks, same cases"}
    write_json_atomic(run / "metrics.json", results)
    with atomic_path(run / "per_case.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    plots.plot_history(run / "history.csv", run / "plots" / "training_curves.png")
    write_segmentation_section(run, results, rows, split)
    return results


def write_segmentation_section(run: Path, results: dict, rows: list[dict], split: str) -> Path:
    """``report_sections/segmentation.json``: the model beside the human observer, per-case table, overlays."""
    import base64

    unit = results["distance_unit"]
    test = results[split]["metrics"]
    ref = results.get("reference_observer", {}).get("metrics", {})
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    head = "<tr><th class='l'>metric</th><th>model</th><th>95% CI</th>" + (
        "<th>second observer</th><th>95% CI</th>" if ref else "") + "</tr>"
    body = []
    for k, v in test.items():
        name = PRETTY.get(k, k) + (f" ({unit})" if k in ("hd95", "msd") else "")
        cells = f"<td class='l'>{name}</td><td>{fmt(v['value'])}</td><td>{fmt(v['ci_low'])} - {fmt(v['ci_high'])}</td>"
        if ref and k in ref:
            r = ref[k]
            cells += f"<td>{fmt(r['value'])}</td><td>{fmt(r['ci_low'])} - {fmt(r['ci_high'])}</td>"
        body.append(f"<tr>{cells}</tr>")
    per = [r for r in rows if r["split"] == split]
    cols = [k for k in ("dice", "iou", "sensitivity", "precision", "hd95", "msd", "cldice") if per and k in per[0]]
    case_rows = "".join(
        f"<tr><td class='l'>{html.escape(r['case'])}</td><td class='l'>{html.escape(str(r['patient_id']))}</td>"
        + "".join(f"<td>{fmt(r[k])}</td>" for k in cols) + f"<td>{r['seconds']:.2f}</td></tr>" for r in per)
    figs = []
    for r in sorted(per, key=lambda r: r["dice"])[:4]:
        p = run / "predictions" / f"{r['case']}_overlay.png"
        if p.exists():
            figs.append(f"<figure><img alt='overlay {html.escape(r['case'])}' style='max-width:480px' "
                        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                        f"<figcaption>{html.escape(r['case'])}: Dice {r['dice']:.3f} (prediction red, reference "
                        f"outline green)</figcaption></figure>")
    note = ("Means over cases; 95% CIs by bootstrap over patients (cases of one patient resampled together). "
            f"Threshold {results['threshold']['value']:.2f} chosen on validation. Empty masks: both empty = Dice 1 "
            "and distances 0; only one empty = Dice 0 and distances undefined (left out of the distance means).")
    html_text = (f"<table id='seg-metrics'>{head}{''.join(body)}</table><p class='sub'>{note}</p>"
                 f"<h3>Per case ({split})</h3><table id='seg-cases'><tr><th class='l'>case</th><th class='l'>patient</th>"
                 + "".join(f"<th>{PRETTY.get(k, k)}</th>" for k in cols) + "<th>s</th></tr>" + case_rows + "</table>"
                 f"<h3>Weakest cases</h3><div class='grid'>{''.join(figs)}</div>")
    path = run / "report_sections" / "segmentation.json"
    path.parent.mkdir(exist_ok=True)
    return write_json_atomic(path, {"title": "Segmentation", "html": html_text})


def segment_files(run_dir: str | Path, files: list[str | Path], out_dir: str | Path, tta: bool | None = None,
                  overlay: bool = True, dicom_seg: bool = False) -> list[dict]:
    """Segment image files with a trained run: a mask in each input's geometry, plus an overlay PNG;
    with ``dicom_seg``, DICOM series inputs also get a DICOM SEG referencing their slices."""
    from medlens.data.segmentation import load_case
    from medlens.engine.predict import load_run_model
    from medlens.config import load_config

    net, meta = load_run_model(run_dir, expect="segmentation")
    if tta is not None:
        meta["segmentation"]["tta"] = tta
    cfg = load_config(Path(run_dir) / "config.yaml").data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        f = Path(f)
        case = load_case(f, None, cfg, meta.get("label_values"), "-")
        if case.image.shape[0] != meta["in_channels"] or case.image.ndim - 1 != meta["spatial_dims"]:
            from medlens.errors import ShapeError

            raise ShapeError(f"input has {case.image.shape[0]} channel(s), {case.image.ndim - 1}D; the model expects "
                             f"{meta['in_channels']}, {meta['spatial_dims']}D", f)
        probs = infer_case(net, case.image, meta, f.name)  # warns (MedlensWarning) when it pads
        pred = to_labels(probs, meta)
        mpath = write_mask(pred, case.geometry, mask_path_for(f, out, case.image.ndim - 1), meta)
        row = {"file": str(f), "mask": str(mpath), "foreground_voxels": int((pred > 0).sum())}
        if _spacing(case, meta):
            row["foreground_mm3" if case.image.ndim == 4 else "foreground_mm2"] = float(
                (pred > 0).sum() * np.prod(case.spacing))
        if dicom_seg:
            if "series_uid" not in case.geometry.meta or not f.is_dir():
                import warnings

                from medlens.errors import MedlensWarning

                warnings.warn(f"{f.name} is not a DICOM series folder; no DICOM SEG written", MedlensWarning)
            else:
                from medlens.io.dicom_seg import write_dicom_seg

                row["dicom_seg"] = str(write_dicom_seg(pred, case.geometry, f, out / f"{f.name}_seg.dcm",
                                                       meta["class_names"]))
        if overlay:
            row["overlay"] = str(write_overlay(case.display, pred, None, out / f"{Path(mpath).name.split('_mask')[0]}"
                                                                               f"_overlay.png"))
        results.append(row)
    return results
