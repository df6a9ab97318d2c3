"""Explaining a run folder: files, the faithfulness table, and the report's explanations section."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch

from medlens.errors import ConfigError, MedlensError
from medlens.explain.faithfulness import deletion_insertion, map_similarity, randomized_copy
from medlens.explain.methods import METHODS, TwoClass, applicable, explain
from medlens.explain.render import overlay_png
from medlens.run import Predictor, Run
from medlens.run.sections import write_section
from medlens.transforms.preprocess import prepared_data
from medlens.utils import atomic_path, unique_stems, write_json_atomic

SLOW = {"lime", "kernelshap", "occlusion"}


def _label_name(run: Run, t: int) -> str:
    names = run.class_names
    return names[t] if t < len(names) else str(t)


def _require_torch(run: Run) -> None:
    if run.is_classical:
        raise MedlensError("a classical (hand-made features) run has no attribution maps", run.dir)


def explain_files(run: Run | str | Path, files: list[str | Path], method: str, target: int | None = None,
                  layer: str | None = None, out_dir: str | Path | None = None) -> list[dict]:
    """Maps for image files: ``<name>_<method>.png`` overlays and ``.npy`` raw maps (names made unique)."""
    run = run if isinstance(run, Run) else Run.open(run, expect="classification")
    _require_torch(run)
    predictor = Predictor(run)
    out = Path(out_dir) if out_dir else run.dir / "explanations"
    x = torch.from_numpy(np.stack([predictor.prepare(f) for f in files]))
    numeric = run.task_type.numeric
    # a numeric target (issue 26): the map of what raises the predicted value (the one output's gradient)
    maps, info = explain(run.network, x, method, 1 if numeric and target is None else target, layer)
    values = predictor.predict_arrays(x.numpy()) if numeric else None
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for i, (f, stem) in enumerate(zip(files, unique_stems(files))):
        npy = out / f"{stem}_{method}.npy"
        with atomic_path(npy) as tmp:
            np.save(tmp, maps[i])
        t = info["targets"][i]
        name = f"higher {run.class_names[0]}" if values is not None else _label_name(run, t)
        said = f"value={values[i]:.4g}" if values is not None else f"p={info['probabilities'][i]:.3f}"
        title = f"{Path(f).name}: {method} for '{name}' ({said})"
        png = overlay_png(x[i].numpy(), maps[i], out / f"{stem}_{method}.png", title)
        row = {"file": str(f), "target": name, "probability": info["probabilities"][i],
               "png": str(png), "npy": str(npy), "layer": info["layer"]}
        if values is not None:
            row["value"] = float(values[i])
        rows.append(row)
    return rows


def _test_data(run: Run):
    return prepared_data(run.config.data, seed=run.config.seed).test


def evaluate_faithfulness(run_dir: str | Path, methods: list[str] | None = None, n: int = 200, seed: int = 0,
                          sanity_n: int = 24, progress=None) -> list[dict]:
    """Deletion/insertion AUC of each method against a random map on ``n`` test images, the
    randomisation sanity check (Spearman, SSIM) and the time per image."""
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir, expect="classification")
    _require_torch(run)
    net = run.network
    ds = _test_data(run)
    # by default every method that fits the model (attention methods: transformers only, CAM: not them);
    # a method named explicitly that does not fit fails with its one-line reason
    methods = methods or [m for m in METHODS if applicable(m, net)]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from: {', '.join(METHODS)}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), min(n, len(ds)), replace=False))
    x, _ = ds.batch(idx)
    rnd_net = randomized_copy(net, seed)
    rows = []
    random_maps = rng.random((len(x),) + tuple(x.shape[2:])).astype(np.float32)
    with torch.no_grad():
        pred = torch.softmax(TwoClass(net)(x).float(), 1).argmax(1).numpy()
    rd, ri = deletion_insertion(net, x, random_maps, pred)
    for k, m in enumerate(methods):
        if progress:
            progress(k, len(methods), m)
        if (x.ndim - 2) not in METHODS[m].dims:
            continue
        t0 = time.perf_counter()
        maps = np.concatenate([explain(net, x[i:i + 50], m, pred[i:i + 50])[0] for i in range(0, len(x), 50)])
        per_image = (time.perf_counter() - t0) / len(x)
        d, ins = deletion_insertion(net, x, maps, pred)
        s = slice(0, min(sanity_n, len(x)))
        rmaps = explain(rnd_net, x[s], m, pred[s])[0]
        rho, ssim = map_similarity(maps[s], rmaps)
        rows.append({"method": m, "n": int(len(x)), "deletion_auc": float(d.mean()), "random_deletion_auc": float(rd.mean()),
                     "insertion_auc": float(ins.mean()), "random_insertion_auc": float(ri.mean()),
                     "beats_random_deletion": bool(d.mean() < rd.mean()),
                     "beats_random_insertion": bool(ins.mean() > ri.mean()),
                     "randomisation_spearman": rho, "randomisation_ssim": ssim, "seconds_per_image": per_image})
    write_json_atomic(run.dir / "explanations" / "faithfulness.json", rows)
    return rows


# the report's candidates when the config names no method: gradient and CAM methods, a second or so per image
REPORT_CANDIDATES = ("gradcam", "gradcam++", "layercam", "saliency", "integrated_gradients")


def faithfulness_against_random(net, x: torch.Tensor, method: str, seed: int = 0) -> dict:
    """Deletion and insertion AUC of ``method``'s maps of the predicted class on ``x``, and of a random map on
    the same images; whether the method beats random on each (deletion: lower, insertion: higher)."""
    with torch.no_grad():
        pred = torch.softmax(TwoClass(net)(x).float(), 1).argmax(1).numpy()
    random_maps = np.random.default_rng(seed).random((len(x),) + tuple(x.shape[2:])).astype(np.float32)
    rd, ri = deletion_insertion(net, x, random_maps, pred)
    maps = explain(net, x, method, pred)[0]
    d, ins = deletion_insertion(net, x, maps, pred)
    return {"method": method, "n": int(len(x)), "deletion_auc": float(d.mean()), "random_deletion_auc": float(rd.mean()),
            "insertion_auc": float(ins.mean()), "random_insertion_auc": float(ri.mean()),
            "beats_random_deletion": bool(d.mean() < rd.mean()),
            "beats_random_insertion": bool(ins.mean() > ri.mean())}


def _sample(ds, n: int, seed: int) -> torch.Tensor:
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(n, len(ds)), replace=False))
    return ds.batch(idx)[0]


def choose_report_method(net, val, n: int = 8, seed: int = 0, candidates=REPORT_CANDIDATES) -> tuple[str, list[dict]]:
    """The candidate most faithful on ``n`` validation images (highest insertion minus deletion AUC; each
    against the same random maps), and every candidate's scores."""
    x = _sample(val, n, seed)
    usable = [m for m in candidates if m in METHODS and applicable(m, net) and (x.ndim - 2) in METHODS[m].dims]
    rows = [faithfulness_against_random(net, x, m, seed) for m in usable]
    if not rows:
        raise MedlensError("no attribution method fits this model for the report's explanations")
    best = max(rows, key=lambda r: r["insertion_auc"] - r["deletion_auc"])
    return best["method"], rows


def _rows(df: pd.DataFrame, keep) -> pd.DataFrame:
    """The rows of ``df`` where the boolean mask ``keep`` holds (pandas types boolean indexing as giving a frame
    or a column)."""
    return cast(pd.DataFrame, df[keep])


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def write_report_section(run: Run | str | Path, method: str | None = None, k: int = 3, predictor=None,
                         test=None, val=None) -> Path | None:
    """Maps of the top true positives, the false positives and the false negatives (binary runs), or the
    most confident correct and wrong cases (multi-class), as the data of the report's explanations
    section (``report_sections/explanations.json``; the report renders it through an escaping template).

    ``method``: the one asked for (``explain.method`` in the config when None), else the most faithful on a
    few validation images (``choose_report_method``). The shown method's deletion and insertion AUC against
    random on ``explain.score_images`` test images go with the maps, so the report can say whether it beats
    random."""
    run = run if isinstance(run, Run) else Run.open(run, expect="classification")
    if run.is_classical:
        return None  # hand-made features: no attribution maps
    net = run.network
    ecfg = run.config.explain
    method = method or ecfg.method
    if method is not None and method not in METHODS:
        raise ConfigError(f"explain.method '{method}' is not a method; choose from: {', '.join(METHODS)}")
    chosen_on = None
    if method is None:
        if val is None or test is None:
            data = prepared_data(run.config.data, seed=run.config.seed)
            val, test = data.val, data.test
        method, candidates = choose_report_method(net, val, ecfg.select_images, run.config.seed)
        chosen_on = {"split": "val", "n": candidates[0]["n"], "candidates": candidates}
    preds = pd.read_csv(run.dir / "predictions.csv")
    tp = _rows(preds, preds["split"] == "test").reset_index(drop=True)
    task = run.task_type
    if task.has_threshold:  # decisions at the validation threshold: the outcome groups
        pos, neg = tp.label == 1, tp.label == 0
        groups = {"True positives (highest probability)": _rows(tp, pos & (tp.pred == 1)).nlargest(k, "prob"),
                  "False positives": _rows(tp, neg & (tp.pred == 1)).nlargest(k, "prob"),
                  "False negatives": _rows(tp, pos & (tp.pred == 0)).nsmallest(k, "prob")}
    elif task.exclusive:  # one class per case by argmax: right and wrong, most confident first
        pcols = [c for c in tp.columns if c.startswith("prob_")]
        tp = tp.assign(conf=cast(pd.DataFrame, tp[pcols]).max(axis=1))
        groups = {"Correct, most confident": _rows(tp, tp.label == tp.pred).nlargest(k, "conf"),
                  "Wrong, most confident": _rows(tp, tp.label != tp.pred).nlargest(k, "conf")}
    else:
        return None
    ds = test if test is not None else _test_data(run)
    out = run.dir / "explanations" / "report"
    data = {"method": method, "groups": [], "faithfulness": [], "chosen_on": chosen_on,
            "shown": {**faithfulness_against_random(net, _sample(ds, ecfg.score_images, run.config.seed + 1), method,
                                                    run.config.seed), "split": "test"}}
    for title, rows in groups.items():
        cases = []
        for r in rows.to_dict("records"):
            i = int(r["index"])
            x, _ = ds.batch([i])
            maps, info = explain(net, x, method)
            t = info["targets"][0]
            p = r["prob"] if "prob" in r else r["conf"]  # the run's (calibrated) probability and decision
            if "prob" in r and int(r["pred"]) == 0:  # binary: prob is P(positive); the caption gives P(predicted)
                p = 1.0 - p
            cap = (f"#{i}: true {_label_name(run, int(r['label']))}, predicted {_label_name(run, int(r['pred']))} "
                   f"(p={p:.2f}); map for '{_label_name(run, t)}'")
            png = overlay_png(x[0].numpy(), maps[0], out / f"{title.split()[0].lower()}_{i}.png", cap)
            cases.append({"caption": cap, "png": _b64(png)})
        data["groups"].append({"title": title, "cases": cases})
    faith = run.dir / "explanations" / "faithfulness.json"
    if faith.exists():
        data["faithfulness"] = json.loads(faith.read_text())
    return write_section(run.dir, "explanations", "Explanations", data)
