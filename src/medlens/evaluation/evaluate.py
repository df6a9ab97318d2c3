"""Evaluate a run folder: predictions, threshold from validation, metrics with CIs, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medlens.errors import MedlensError
from medlens.evaluation.metrics import compute_metrics
from medlens.run import Predictor, Run
from medlens.tasks import TaskType
from medlens.transforms.preprocess import prepared_data
from medlens.utils import atomic_path, write_json_atomic

BINARY = TaskType.BINARY


def evaluate_run(run: Run | str | Path, split: str = "test", data=None, predictor: Predictor | None = None) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` and ``plots/`` for a trained classifier run.

    The binary decision threshold is the run's, chosen on the validation split when it was trained
    (``RunMeta.threshold``); test labels never influence it.
    """
    from medlens.evaluation import plots

    run = run if isinstance(run, Run) else Run.open(run, expect="classification")
    predictor = predictor or Predictor(run)
    meta, cfg = run.meta, run.config
    if data is None:
        data = prepared_data(cfg.data, seed=cfg.seed)
    threshold = None
    if meta.task == BINARY:
        if meta.threshold is None:
            raise MedlensError("the run records no validation threshold (it did not finish training)", run.dir)
        threshold = meta.threshold.value
    predictor = predictor.predict_dataset
    task, names = meta.task, meta.class_names
    val = data.val
    p_val = predictor(val)
    ev = cfg.evaluation
    results = {"task": str(task), "class_names": names, "dataset": meta.dataset,
               "split_method": meta.split_method, "evaluated_split": split,
               "val": compute_metrics(task, val.labels, p_val, threshold, ev.bootstrap, ev.ci, cfg.seed)}
    if task == BINARY:
        results["threshold"] = meta.threshold.model_dump()  # a copy for the reader; the run holds it
    pred_frames = [_pred_frame("val", val, p_val, task, threshold, names)]
    if split != "val":
        ds = data.get(split)
        p = predictor(ds)
        results[split] = compute_metrics(task, ds.labels, p, threshold, ev.bootstrap, ev.ci, cfg.seed)
        pred_frames.append(_pred_frame(split, ds, p, task, threshold, names))
    else:
        ds, p = val, p_val
    write_json_atomic(run.dir / "metrics.json", results)
    with atomic_path(run.dir / "predictions.csv") as tmp:
        pd.concat(pred_frames).to_csv(tmp, index=False)
    pdir = run.dir / "plots"
    plots.plot_history(run.dir / "history.csv", pdir / "training_curves.png")
    plots.plot_roc(task, ds.labels, p, names, pdir / "roc.png", threshold, title=f"ROC ({split})")
    if task == BINARY:  # galleries of the errors, as the LUNA16 seed system shows them
        for kind, sel in (("fp", (ds.labels == 0) & (p >= threshold)), ("fn", (ds.labels == 1) & (p < threshold))):
            idx = np.flatnonzero(sel)
            idx = idx[np.argsort(-p[idx] if kind == "fp" else p[idx])][:16]
            out = pdir / f"gallery_{kind}.png"
            if len(idx):
                x, _ = ds.batch(np.sort(idx))
                imgs = x.numpy()[:, 0]
                if imgs.ndim == 4:  # 3D: the middle axial slice
                    imgs = imgs[:, imgs.shape[1] // 2]
                plots.grid_png(imgs, out, f"{'false positives' if kind == 'fp' else 'false negatives'} ({split}, "
                                    f"{int(sel.sum())} in all; most confident first)")
            elif out.exists():
                out.unlink()
    if "confusion_matrix" in results[split]:
        plots.plot_confusion(results[split]["confusion_matrix"], names, pdir / "confusion_matrix.png",
                             title=f"Confusion matrix ({split})")
    return results


def _pred_frame(split: str, ds, prob: np.ndarray, task: str, threshold, names) -> pd.DataFrame:
    df = pd.DataFrame({"split": split, "index": np.arange(len(ds)), "source": ds.sources,
                       "patient_id": ds.patient_ids})
    if task == BINARY:
        df["label"] = ds.labels
        df["prob"] = prob
        df["pred"] = (prob >= threshold).astype(int)
    elif task == TaskType.MULTILABEL:
        for j, n in enumerate(names):
            df[f"label_{j}"] = ds.labels[:, j].astype(int)
            df[f"prob_{j}"] = prob[:, j]
    else:
        df["label"] = ds.labels
        for j in range(prob.shape[1]):
            df[f"prob_{j}"] = prob[:, j]
        df["pred"] = prob.argmax(1)
    return df
