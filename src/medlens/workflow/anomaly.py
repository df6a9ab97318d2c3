"""``task: anomaly``: an autoencoder learns the normal class of the training split only; the anomaly
score (reconstruction error or SSIM dissimilarity, measured side by side) ranks test images; the threshold
and calibration come from validation; evaluation, report and predict are the binary classifiers', because
the network's output is an anomaly logit (``models.autoencoder``).

The run is an ordinary run folder (``RunMeta`` with ``task: binary`` and ``anomaly`` filled in), so
``medlens evaluate``, ``report``, ``predict`` and ``serve`` work on it unchanged. The report's anomaly
section shows, for the same test cases, the input, its reconstruction, the pixel-wise anomaly map and the
supervised run's Grad-CAM (``anomaly.compare_run``), and the test AUC (95% CI) of both.
"""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medlens.engine.anomaly import anomaly_scores, fit_autoencoder, set_score
from medlens.engine.network import ClassifierNet
from medlens.engine.train import build_network
from medlens.errors import ConfigError, MedlensError, MedlensWarning
from medlens.evaluation.calibration import calibration_method, fit_calibration
from medlens.evaluation.evaluate import evaluate_run
from medlens.evaluation.metrics import compute_metrics
from medlens.evaluation.threshold import choose_threshold
from medlens.explain.methods import explain
from medlens.explain.render import panels_png
from medlens.models import get_model_entry
from medlens.models.autoencoder import SCORES, AnomalyAutoEncoder
from medlens.run import InputPrep, Predictor, Run, RunMeta, Threshold
from medlens.run.profile import profile_of
from medlens.run.sections import write_section
from medlens.tasks import TaskType
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.lifecycle import Progress, finish, loading, write_record, write_start

_EPS = 1e-8


def _normal_index(cfg, class_names: list[str]) -> int:
    want = cfg.anomaly.normal_class
    idx = class_names.index(want) if want in class_names else (int(want) if want.isdigit() else None)
    if idx is None or not 0 <= idx < len(class_names):
        raise ConfigError(f"anomaly.normal_class '{want}' is not one of the classes {class_names}")
    if idx != 0:
        raise ConfigError(f"anomaly.normal_class '{class_names[idx]}' is the positive class; the positive class of "
                          "an anomaly run is the abnormal one: set data.positive_class to it")
    return idx


def _standardised_probs(scores: np.ndarray, train_scores: np.ndarray) -> np.ndarray:
    """sigmoid((log s - mean log s_train) / sd log s_train): what the network outputs for that score."""
    lt = np.log(np.clip(train_scores, 0, None).astype(np.float64) + _EPS)
    z = (np.log(np.clip(scores, 0, None).astype(np.float64) + _EPS) - lt.mean()) / max(lt.std(ddof=1), 1e-6)
    return 1.0 / (1.0 + np.exp(-z))


def measure_scores(cfg, net, data, train_normal) -> list[dict]:
    """Each anomaly score (mse, l1, ssim) of the trained autoencoder: validation AUC, and on test the AUC
    with its bootstrap CI and sensitivity/specificity at the threshold chosen on validation."""
    ev = cfg.evaluation
    rows = []
    for kind in SCORES:
        ref = anomaly_scores(net, train_normal, kind)
        p_val = _standardised_probs(anomaly_scores(net, data.val, kind), ref)
        p_test = _standardised_probs(anomaly_scores(net, data.test, kind), ref)
        thr = choose_threshold(data.val.labels, p_val, ev.threshold)
        val = compute_metrics(TaskType.BINARY, data.val.labels, p_val, thr, 0)["metrics"]
        test = compute_metrics(TaskType.BINARY, data.test.labels, p_test, thr, ev.bootstrap, ev.ci, cfg.seed)["metrics"]
        rows.append({"score": kind, "val_auc": val["auc"]["value"], "test_auc": test["auc"]["value"],
                     "test_auc_ci": [test["auc"]["ci_low"], test["auc"]["ci_high"]],
                     "test_sensitivity": test["sensitivity"]["value"],
                     "test_specificity": test["specificity"]["value"]})
    return rows


def supervised_comparison(cfg, meta: RunMeta, log) -> dict:
    """The supervised run of ``anomaly.compare_run``: its test AUC with CI, or why there is none."""
    ref = cfg.anomaly.compare_run
    if not ref:
        return {"available": False, "note": "no supervised run to compare with (set anomaly.compare_run)"}
    folder = Path(ref)
    try:
        sup = Run.open(folder, expect="classification")
        metrics = json.loads((folder / "metrics.json").read_text())
        auc = metrics["test"]["metrics"]["auc"]
    except (MedlensError, OSError, ValueError, KeyError) as e:
        reason = "not found" if not folder.exists() else f"not usable ({str(e).splitlines()[0][:120]})"
        note = (f"anomaly.compare_run {ref}: supervised run {reason}; train it first (e.g. `medlens train "
                "configs/pneumoniamnist_cnn.yaml`) to see the supervised AUC and Grad-CAM beside the anomaly maps")
        warnings.warn(note, MedlensWarning, stacklevel=2)
        log(f"warning: {note}")
        return {"available": False, "note": note}
    if sup.meta.dataset != meta.dataset or sup.meta.task != TaskType.BINARY:
        note = (f"anomaly.compare_run {ref}: a {sup.meta.task} run on {sup.meta.dataset}, not a binary run on "
                f"{meta.dataset}; no comparison")
        warnings.warn(note, MedlensWarning, stacklevel=2)
        log(f"warning: {note}")
        return {"available": False, "note": note}
    same_input = sup.meta.input_size == meta.input_size and sup.meta.in_channels == meta.in_channels
    return {"available": True, "run": sup.name, "dir": str(folder), "model": sup.meta.model,
            "auc": auc["value"], "ci_low": auc["ci_low"], "ci_high": auc["ci_high"], "same_input": same_input,
            "note": "" if same_input else "the supervised run takes another input size: no Grad-CAM beside"}


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def write_anomaly_section(run: Run, test, scores: list[dict], comparison: dict, k: int = 3) -> Path:
    """The report's anomaly section: score comparison, anomaly vs supervised AUC, and for the same test
    cases the input, reconstruction, anomaly map and the supervised model's Grad-CAM."""
    net = run.model
    if not isinstance(net, ClassifierNet) or not isinstance(net.net, AnomalyAutoEncoder):
        raise MedlensError("the run's network is not an anomaly autoencoder", run.dir)
    ae = net.net
    preds = pd.read_csv(run.dir / "predictions.csv")
    tp = preds.loc[preds["split"] == "test"].reset_index(drop=True)
    label, pred = tp["label"], tp["pred"]
    names = run.class_names
    groups = {f"{names[1]}: flagged, most anomalous (true positives)": tp.loc[(label == 1) & (pred == 1)].nlargest(k, "prob"),
              f"{names[1]}: missed (false negatives)": tp.loc[(label == 1) & (pred == 0)].nsmallest(k, "prob"),
              f"{names[0]}: flagged (false positives)": tp.loc[(label == 0) & (pred == 1)].nlargest(k, "prob")}
    sup: tuple[torch.nn.Module, pd.DataFrame] | None = None   # the supervised network, its test predictions
    if comparison.get("available") and comparison.get("same_input"):
        sup_net = Run.open(comparison["dir"], expect="classification").model
        if not isinstance(sup_net, torch.nn.Module):
            raise MedlensError("the supervised run is a classical model: no Grad-CAM to show beside", comparison["dir"])
        sp = pd.read_csv(Path(comparison["dir"]) / "predictions.csv")
        sup = sup_net, sp.loc[sp["split"] == "test"].set_index("source")
    out = run.dir / "explanations" / "anomaly"
    data = {"score": run.meta.anomaly.get("score") if run.meta.anomaly else None, "scores": scores,
            "comparison": comparison, "auc": None, "groups": []}
    metrics = json.loads((run.dir / "metrics.json").read_text())
    data["auc"] = metrics["test"]["metrics"]["auc"]
    for title, rows in groups.items():
        cases = []
        for r in rows.to_dict("records"):
            i = int(r["index"])
            x, _ = test.batch([i])
            with torch.no_grad():
                xn = net.normalize(x)
                recon = ae.reconstruct(xn)
                amap = ae.error_map(xn, recon=recon)
            panels = [("input", x[0].numpy(), "image"), ("reconstruction", recon[0].numpy(), "image"),
                      (f"anomaly map ({ae.score})", amap[0].numpy(), "heat")]
            cap = f"#{i}: true {names[int(r['label'])]}; anomaly p={r['prob']:.2f} ({names[int(r['pred'])]})"
            if sup is not None:
                sup_net, sup_preds = sup
                gmap, info = explain(sup_net, x, "gradcam", target=1)
                panels.append((f"supervised Grad-CAM ({names[1]})", gmap[0], "heat"))
                s = sup_preds.loc[r["source"]] if r["source"] in sup_preds.index else None
                if s is not None:
                    cap += f"; supervised p={float(s['prob']):.2f} ({names[int(s['pred'])]})"
            png = panels_png(x[0].numpy(), panels, out / f"{title.split()[1].strip(':,').lower()}_{i}.png", cap)
            cases.append({"caption": cap, "png": _b64(png)})
        data["groups"].append({"title": title, "cases": cases})
    return write_section(run.dir, "anomaly", "Anomaly detection (autoencoder, normal class only)", data)


def train_anomaly(cfg, path: Path, resume: bool, callbacks, progress_bar: bool, log,
                  progress: Progress | None = None) -> Run:
    """Fit and finish one anomaly run in ``path`` (held by ``lifecycle.RunStart``). ``progress``: the loading
    (``lifecycle.loading``)."""
    if get_model_entry(cfg.model.name).task != "anomaly":
        raise ConfigError(f"model '{cfg.model.name}' is not an anomaly model; task: anomaly trains 'autoencoder'")
    with loading(progress) as report:
        data = prepared_data(cfg.data, seed=cfg.seed, progress=report)
    tr = data.train
    if len(tr) == 0 or len(data.val) == 0 or len(data.test) == 0:
        raise MedlensError(f"empty split: train {len(tr)}, val {len(data.val)}, test {len(data.test)}")
    if data.task != TaskType.BINARY:
        raise ConfigError(f"task: anomaly needs two classes (normal, abnormal); the data are {data.task} "
                          f"{data.class_names}: merge them with data.label_map")
    calibration_method(data.task, cfg.evaluation.calibration)
    normal = _normal_index(cfg, data.class_names)
    train_normal = tr.subset(np.flatnonzero(tr.labels == normal), name=tr.name)
    val_normal = data.val.subset(np.flatnonzero(data.val.labels == normal), name=data.val.name)
    if len(train_normal) == 0 or len(val_normal) == 0:
        raise MedlensError(f"no '{data.class_names[normal]}' images to learn from: train {len(train_normal)}, "
                           f"val {len(val_normal)}")
    c = tr.in_channels
    params = dict(cfg.model.params)
    requested = params.pop("score", None) or cfg.anomaly.score
    if requested != "auto" and cfg.anomaly.score != "auto" and requested != cfg.anomaly.score:
        raise ConfigError(f"model.params.score '{requested}' and anomaly.score '{cfg.anomaly.score}' disagree")
    meta = RunMeta(
        kind="torch", task=TaskType.BINARY, model=cfg.model.name, model_params=params, in_channels=c, n_outputs=1,
        input_size=list(tr.image_shape), class_names=data.class_names,
        # the autoencoder reconstructs images in [0, 1] (SSIM's data range): no dataset normalisation
        preprocessing=InputPrep(spatial_dims=tr.spatial_dims, size=list(tr.image_shape), color=cfg.data.color,
                                clahe=cfg.data.clahe, mean=[0.0] * c, std=[1.0] * c, window=cfg.data.window),
        split_method=data.split_method, dataset=cfg.data.name or cfg.data.path,
        n_samples={s: len(data.get(s)) for s in ("train", "val", "test")},
        class_counts={s: data.get(s).class_counts().tolist() for s in ("train", "val", "test")},
        anomaly={"normal_class": data.class_names[normal], "train_images": len(train_normal),
                 "val_images_for_model_selection": len(val_normal), "score_rule": requested})
    meta.input_profile = profile_of(data, cfg.data)
    write_start(cfg, meta, path)
    torch.manual_seed(cfg.seed)
    net = build_network(meta.model, c, 1, tr.spatial_dims, meta.input_size,
                        {**params, "score": "mse" if requested == "auto" else requested}, meta.preprocessing.mean,
                        meta.preprocessing.std)
    log(f"anomaly: training the autoencoder on {len(train_normal)} '{data.class_names[normal]}' training images "
        f"only ({len(tr) - len(train_normal)} others left out)")
    net, fit = fit_autoencoder(cfg, train_normal, val_normal, net, path, resume, callbacks, progress_bar)
    scores = measure_scores(cfg, net, data, train_normal)
    chosen = max(scores, key=lambda r: r["val_auc"])["score"] if requested == "auto" else requested
    for r in scores:
        r["chosen"] = r["score"] == chosen
    net = set_score(net, chosen, train_normal, path)
    meta = meta.model_copy(update=fit.summary())
    meta.model_params = {**params, "score": chosen}
    meta.anomaly = {**(meta.anomaly or {}), "score": chosen, "scores": scores}
    write_record(path / "anomaly_scores.json", scores)
    run = Run(path, meta, cfg).use_model(net)
    predictor = Predictor(run)
    raw_val = predictor.predict_dataset(data.val, calibrated=False)
    run.meta.calibration = fit_calibration(meta.task, data.val.labels, raw_val, cfg.evaluation.calibration)
    p_val = run.meta.calibration.apply(raw_val) if run.meta.calibration else raw_val
    rule = cfg.evaluation.threshold
    run.meta.threshold = Threshold(rule=rule, value=choose_threshold(data.val.labels, p_val, rule))

    def evaluate(r: Run) -> tuple[dict, dict]:
        results = evaluate_run(r, data=data, predictor=predictor)
        comparison = supervised_comparison(cfg, meta, log)
        write_anomaly_section(r, data.test, scores, comparison, cfg.anomaly.cases)
        return results, comparison

    results, comparison = finish(run, evaluate)
    for r in scores:
        log(f"anomaly score {r['score']:>4}: val AUC {r['val_auc']:.3f}, test AUC {r['test_auc']:.3f} "
            f"(95% CI {r['test_auc_ci'][0]:.3f}-{r['test_auc_ci'][1]:.3f}){'  <- chosen on validation' if r['chosen'] else ''}")
    auc = results["test"]["metrics"]["auc"]
    line = (f"test AUC: anomaly ({chosen}, no disease labels) {auc['value']:.3f} "
            f"(95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})")
    if comparison.get("available"):
        line += (f" | supervised {comparison['run']} ({comparison['model']}) {comparison['auc']:.3f} "
                 f"(95% CI {comparison['ci_low']:.3f}-{comparison['ci_high']:.3f})")
    log(line)
    return run
