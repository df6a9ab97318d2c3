"""Explaining a run folder: files, the faithfulness table, and the report's explanations section."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medlens.errors import ConfigError
from medlens.explain.faithfulness import deletion_insertion, map_similarity, randomized_copy
from medlens.explain.methods import METHODS, explain
from medlens.explain.render import overlay_png
from medlens.utils import atomic_path, write_json_atomic

SLOW = {"lime", "kernelshap", "occlusion"}


def _label_name(meta: dict, t: int) -> str:
    names = meta["class_names"]
    return names[t] if t < len(names) else str(t)


def explain_files(run_dir: str | Path, files: list[str | Path], method: str, target: int | None = None,
                  layer: str | None = None, out_dir: str | Path | None = None) -> list[dict]:
    """Maps for image files: ``<stem>_<method>.png`` overlays and ``<stem>_<method>.npy`` raw maps."""
    from medlens.engine.predict import load_run_model, prepare_file

    net, meta = load_run_model(run_dir, expect="classification")
    out = Path(out_dir) if out_dir else Path(run_dir) / "explanations"
    x = torch.from_numpy(np.stack([prepare_file(f, meta) for f in files]))
    maps, info = explain(net, x, method, target, layer)
    rows = []
    for i, f in enumerate(files):
        stem = Path(f).name.split(".")[0]
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / f"{stem}_{method}.npy") as tmp:
            np.save(tmp, maps[i])
        t = info["targets"][i]
        title = f"{Path(f).name}: {method} for '{_label_name(meta, t)}' (p={info['probabilities'][i]:.3f})"
        png = overlay_png(x[i].numpy(), maps[i], out / f"{stem}_{method}.png", title)
        rows.append({"file": str(f), "target": _label_name(meta, t), "probability": info["probabilities"][i],
                     "png": str(png), "npy": str(out / f"{stem}_{method}.npy"), "layer": info["layer"]})
    return rows


def _test_data(run_dir: Path):
    from medlens.config import load_config
    from medlens.data import build_data

    cfg = load_config(run_dir / "config.yaml")
    return build_data(cfg.data, seed=cfg.seed).test


def evaluate_faithfulness(run_dir: str | Path, methods: list[str] | None = None, n: int = 200, seed: int = 0,
                          sanity_n: int = 24, progress=None) -> list[dict]:
    """Deletion/insertion AUC of each method against a random map on ``n`` test images, the
    randomisation sanity check (Spearman, SSIM) and the time per image."""
    from medlens.engine.predict import load_run_model

    run = Path(run_dir)
    net, meta = load_run_model(run, expect="classification")
    ds = _test_data(run)
    methods = methods or list(METHODS)
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
        from medlens.explain.methods import TwoClass

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
    write_json_atomic(run / "explanations" / "faithfulness.json", rows)
    return rows


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def write_report_section(run_dir: str | Path, method: str = "gradcam", k: int = 3) -> Path | None:
    """Maps of the top true positives, the false positives and the false negatives (binary runs), or the
    most confident correct and wrong cases (multi-class), as ``report_sections/explanations.json``."""
    from medlens.engine.predict import load_run_model

    run = Path(run_dir)
    if json.loads((run / "run.json").read_text()).get("kind") == "classical":
        return None  # hand-made features: no attribution maps
    net, meta = load_run_model(run, expect="classification")
    preds = pd.read_csv(run / "predictions.csv")
    test = preds[preds["split"] == "test"].reset_index(drop=True)
    if meta["task"] == "binary":
        groups = {"True positives (highest probability)": test[(test.label == 1) & (test.pred == 1)].nlargest(k, "prob"),
                  "False positives": test[(test.label == 0) & (test.pred == 1)].nlargest(k, "prob"),
                  "False negatives": test[(test.label == 1) & (test.pred == 0)].nsmallest(k, "prob")}
    elif meta["task"] in ("multiclass", "ordinal"):
        pcols = [c for c in test.columns if c.startswith("prob_")]
        test = test.assign(conf=test[pcols].max(1))
        groups = {"Correct, most confident": test[test.label == test.pred].nlargest(k, "conf"),
                  "Wrong, most confident": test[test.label != test.pred].nlargest(k, "conf")}
    else:
        return None
    ds = _test_data(run)
    out = run / "explanations" / "report"
    html = [f"<p>Method: <b>{method}</b> (target: the predicted class). Test cases chosen from predictions.csv.</p>"]
    for title, rows in groups.items():
        html.append(f"<h3>{title} ({len(rows)})</h3><div class='grid'>")
        if rows.empty:
            html.append("<p>none</p>")
        for _, r in rows.iterrows():
            i = int(r["index"])
            x, _ = ds.batch([i])
            maps, info = explain(net, x, method)
            t = info["targets"][0]
            cap = (f"#{i}: true {_label_name(meta, int(r.label))}, predicted {_label_name(meta, t)} "
                   f"(p={info['probabilities'][0]:.2f})")
            png = overlay_png(x[0].numpy(), maps[0], out / f"{title.split()[0].lower()}_{i}.png", cap)
            html.append(f"<figure><img alt='{cap}' src='data:image/png;base64,{_b64(png)}' style='max-width:380px'>"
                        f"<figcaption>{cap}</figcaption></figure>")
        html.append("</div>")
    faith = run / "explanations" / "faithfulness.json"
    if faith.exists():
        rows = json.loads(faith.read_text())
        html.append("<h3>Faithfulness (deletion: lower is better; insertion: higher is better)</h3><table>"
                    "<tr><th class='l'>method</th><th>deletion</th><th>random</th><th>insertion</th><th>random</th>"
                    "<th>randomised-model Spearman</th><th>s / image</th></tr>")
        for r in rows:
            html.append(f"<tr><td class='l'>{r['method']}</td><td>{r['deletion_auc']:.3f}</td>"
                        f"<td>{r['random_deletion_auc']:.3f}</td><td>{r['insertion_auc']:.3f}</td>"
                        f"<td>{r['random_insertion_auc']:.3f}</td><td>{r['randomisation_spearman']:.2f}</td>"
                        f"<td>{r['seconds_per_image']:.4f}</td></tr>")
        html.append("</table>")
    path = run / "report_sections" / "explanations.json"
    write_json_atomic(path, {"title": "Explanations", "html": "\n".join(html)})
    return path
