"""Evaluate a run folder: predictions, threshold from validation, metrics with CIs, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medlens.data.catalog import BINARY
from medlens.evaluation.metrics import compute_metrics
from medlens.evaluation.threshold import choose_threshold
from medlens.utils import atomic_path, write_json_atomic


def evaluate_run(run_dir: str | Path, split: str = "test", data=None, net=None, predictor=None) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` and ``plots/`` for a trained run.

    The binary decision threshold is chosen on the validation split by the config's rule and only
    then applied to ``split``; test labels never influence it.
    """
    from medlens.config import load_config
    from medlens.data import build_data
    from medlens.engine.predict import load_run_model, predict_dataset, read_run_meta
    from medlens.evaluation import plots

    run = Path(run_dir)
    meta = read_run_meta(run)
    cfg = load_config(run / "config.yaml")
    if predictor is None:
        if meta.get("kind") == "classical":
            from medlens.engine.classical import ClassicalPredictor

            predictor = ClassicalPredictor(run, meta["task"])
        else:
            if net is None:
                net, meta = load_run_model(run)
            predictor = lambda ds: predict_dataset(net, ds)  # noqa: E731
    if data is None:
        data = build_data(cfg.data, seed=cfg.seed)
    task, names = meta["task"], meta["class_names"]
    val = data.val
    p_val = predictor(val)
    threshold = choose_threshold(val.labels, p_val, cfg.evaluation.threshold) if task == BINARY else None
    ev = cfg.evaluation
    results = {"task": task, "class_names": names, "dataset": meta.get("dataset"),
               "split_method": meta.get("split_method"), "evaluated_split": split,
               "val": compute_metrics(task, val.labels, p_val, threshold, ev.bootstrap, ev.ci, cfg.seed)}
    if task == BINARY:
        results["threshold"] = {"rule": ev.threshold, "value": threshold, "chosen_on": "val"}
    pred_frames = [_pred_frame("val", val, p_val, task, threshold, names)]
    if split != "val":
        ds = data.get(split)
        p = predictor(ds)
        results[split] = compute_metrics(task, ds.labels, p, threshold, ev.bootstrap, ev.ci, cfg.seed)
        pred_frames.append(_pred_frame(split, ds, p, task, threshold, names))
    else:
        ds, p = val, p_val
    write_json_atomic(run / "metrics.json", results)
    with atomic_path(run / "predictions.csv") as tmp:
        pd.concat(pred_frames).to_csv(tmp, index=False)
    pdir = run / "plots"
    plots.plot_history(run / "history.csv", pdir / "training_curves.png")
    plots.plot_roc(task, ds.labels, p, names, pdir / "roc.png", threshold, title=f"ROC ({split})")
    if task == BINARY:  # galleries of the errors, as the LUNA16 seed system shows them
        from medlens.explain.render import grid_png

        for kind, sel in (("fp", (ds.labels == 0) & (p >= threshold)), ("fn", (ds.labels == 1) & (p < threshold))):
            idx = np.flatnonzero(sel)
            idx = idx[np.argsort(-p[idx] if kind == "fp" else p[idx])][:16]
            out = pdir / f"gallery_{kind}.png"
            if len(idx):
                x, _ = ds.batch(np.sort(idx))
                imgs = x.numpy()[:, 0]
                if imgs.ndim == 4:  # 3D: the middle axial slice
                    imgs = imgs[:, imgs.shape[1] // 2]
                grid_png(imgs, out, f"{'false positives' if kind == 'fp' else 'false negatives'} ({split}, "
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
    elif task == "multilabel":
        for j, n in enumerate(names):
            df[f"label_{j}"] = ds.labels[:, j].astype(int)
            df[f"prob_{j}"] = prob[:, j]
    else:
        df["label"] = ds.labels
        for j in range(prob.shape[1]):
            df[f"prob_{j}"] = prob[:, j]
        df["pred"] = prob.argmax(1)
    return df
