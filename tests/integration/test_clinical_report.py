"""Calibration, decision curve, shift, subgroups, checklist and `medlens compare` on real PneumoniaMNIST runs."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from conftest import tiny_config
from clirun import medlens  # in-process: the console script's entry point

pytestmark = pytest.mark.integration


def _preds(run: Path, split: str) -> pd.DataFrame:
    df = pd.read_csv(run / "predictions.csv")
    return df[df["split"] == split].reset_index(drop=True)


def test_calibration_is_fitted_on_validation_and_used_by_predictions(trained_run):
    from medlens.run import Predictor, Run
    from medlens.run.meta import Calibration
    from medlens.transforms.preprocess import prepared_data

    meta = json.loads((trained_run / "run.json").read_text())
    cal, choice = meta["calibration"], meta["calibration_choice"]
    # issue 26: auto chose by cross-validation inside validation, and run.json says which and by how much
    assert choice["setting"] == "auto" and choice["chosen"] == (cal["method"] if cal else "none")
    losses = choice["held_out_log_loss"]
    assert {"none", "platt", "temperature", "isotonic"} == set(losses)
    if cal is not None:
        assert cal["fitted_on"] == "val"
        assert choice["improvement"] == pytest.approx(losses["none"] - losses[cal["method"]])
        assert choice["improvement"] >= choice["min_gain"]
    else:
        assert losses["none"] - min(losses.values()) < choice["min_gain"]
    run = Run.open(trained_run)
    data = prepared_data(run.config.data, seed=run.config.seed)
    raw = Predictor(run).predict_dataset(data.test, calibrated=False)
    by_hand = Calibration.model_validate(cal).apply(raw) if cal else raw
    test = _preds(trained_run, "test")
    assert np.allclose(test["prob"], by_hand, atol=1e-5)          # predictions.csv holds calibrated probabilities
    if cal is not None and cal["method"] == "platt":
        assert not np.allclose(test["prob"], raw, atol=1e-3)      # ... which differ from the raw ones
        # the Platt fit is the maximum-likelihood logistic regression of the validation labels on the raw logit:
        # its gradient vanishes there (score equations: sum(y - p') = 0 and sum((y - p') * logit) = 0)
        raw_val = Predictor(run).predict_dataset(data.val, calibrated=False)
        zv = np.log(np.clip(raw_val, 1e-7, 1 - 1e-7) / (1 - np.clip(raw_val, 1e-7, 1 - 1e-7)))
        resid = data.val.labels - 1 / (1 + np.exp(-(cal["params"]["a"] * zv + cal["params"]["b"])))
        assert abs(resid.mean()) < 1e-3 and abs((resid * zv).mean()) < 1e-3 * max(1.0, np.abs(zv).mean())
    # the Youden threshold is chosen on the calibrated validation probabilities
    val = _preds(trained_run, "val")
    fpr, tpr, thr = roc_curve(val["label"], val["prob"])
    assert meta["threshold"]["value"] == pytest.approx(min(thr[np.argmax(tpr - fpr)], 1.0))
    # a single-file prediction says its probability is calibrated and equals the hand computation
    from medlens.data.medmnist import load_medmnist

    img = load_medmnist("pneumoniamnist").test.images[int(test["index"][0]), 0]
    pred = Predictor(run).predict_arrays(np.stack([Predictor(run).prepare(img)]))
    assert pred[0] == pytest.approx(by_hand[0], abs=1e-5)


def test_metrics_hold_calibration_decision_curve_and_shift(trained_run):
    from torchmetrics.functional.classification import binary_calibration_error

    m = json.loads((trained_run / "metrics.json").read_text())
    test, val = _preds(trained_run, "test"), _preds(trained_run, "val")
    cal = m["calibration"]
    ece_after = float(binary_calibration_error(torch.tensor(test["prob"].to_numpy()), torch.tensor(test["label"]),
                                               n_bins=15))
    stage = "after" if cal["method"] else "before"     # auto may keep the raw probabilities (issue 26)
    assert ("after" in cal["test"]) == (cal["method"] is not None)
    assert cal["test"][stage]["ece"]["value"] == pytest.approx(ece_after, abs=1e-6)
    assert cal["test"][stage]["ece"]["ci_low"] <= ece_after <= cal["test"][stage]["ece"]["ci_high"]
    assert {"before", stage} <= set(cal["val"]) and (trained_run / "plots" / "reliability.png").stat().st_size > 0
    # decision curve: net benefit at pt = 0.2 by hand from predictions.csv
    d = m["decision_curve"]
    i = d["thresholds"].index(0.2)
    treat = test["prob"] >= 0.2
    nb = ((treat & (test["label"] == 1)).sum() - (treat & (test["label"] == 0)).sum() * 0.25) / len(test)
    assert d["model"][i] == pytest.approx(nb)
    # shift: specificity at the validation threshold on val and on test, by hand
    t = m["threshold"]["value"]
    spec = lambda df: ((df["prob"] < t) & (df["label"] == 0)).sum() / (df["label"] == 0).sum()  # noqa: E731
    op = m["shift"]["operating_point"]["specificity"]
    assert op["val"] == pytest.approx(spec(val)) and op["test"] == pytest.approx(spec(test))
    drop = spec(val) - spec(test)
    flagged = any(f.startswith("the threshold chosen on validation did not transfer") for f in m["shift"]["flags"])
    assert flagged == (drop > 0.05 or (((val["prob"] >= t) & (val["label"] == 1)).sum() / (val["label"] == 1).sum()
                                       - ((test["prob"] >= t) & (test["label"] == 1)).sum()
                                       / (test["label"] == 1).sum()) > 0.05)


def test_report_checklist_and_model_card(trained_run):
    items = json.loads((trained_run / "checklist.json").read_text())
    claim = [i for i in items if i["guideline"] == "CLAIM"]
    tripod = [i for i in items if i["guideline"] == "TRIPOD+AI"]
    assert len(claim) >= 42 and len(tripod) >= 20
    by_topic = {i["topic"]: i for i in items}
    ethics = by_topic["ethics approval and consent"]
    assert ethics["status"] == "not available from the run" and "ethics" in ethics["needed"]
    parts = by_topic["level at which partitions are disjoint"]
    meta = json.loads((trained_run / "run.json").read_text())
    assert parts["status"] == "answered" and meta["split_method"] in parts["value"]
    calib = by_topic["calibration"]
    m = json.loads((trained_run / "metrics.json").read_text())
    assert f"{m['calibration']['test']['before']['ece']['value']:.3f}" in calib["value"]
    card = (trained_run / "model_card.md").read_text()
    assert "## Limitations" in card and "Not a medical device" in card
    html = (trained_run / "report.html").read_text()
    for anchor in ('id="calibration"', 'id="decision-curve"', 'id="shift"', 'id="checklist"', 'id="model-card"'):
        assert anchor in html


@pytest.fixture(scope="module")
def rf_run(tmp_path_factory, data_root):
    from medlens.workflow.train import train

    tmp = tmp_path_factory.mktemp("rf")
    return train(tiny_config(tmp, "rf", model={"name": "random_forest", "params": {"n_estimators": 60}}),
                 progress_bar=False)


def _delong_by_hand(y, a, b):
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        gt = (s[pos][:, None] > s[neg][None, :]).astype(float) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        comps.append((gt.mean(1), gt.mean(0), gt.mean()))
    cov = np.cov(np.vstack([c[0] for c in comps])) / pos.sum() + np.cov(np.vstack([c[1] for c in comps])) / neg.sum()
    diff = comps[0][2] - comps[1][2]
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    from scipy.stats import norm

    return diff, se, 2 * norm.sf(abs(diff / se))


def test_compare_cnn_against_random_forest(trained_run, rf_run, tmp_path):
    out = tmp_path / "cmp"
    r = medlens("compare", trained_run, rf_run, "--out", out, "--bootstrap", "200")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "compare.json").read_text())
    a, b = _preds(trained_run, "test"), _preds(rf_run, "test").set_index("source").loc[_preds(trained_run, "test")["source"]]
    y = a["label"].to_numpy()
    diff, se, p = _delong_by_hand(y, a["prob"].to_numpy(), b["prob"].to_numpy())
    d = res["pairs"][0]["delong"]
    assert d["difference"] == pytest.approx(roc_auc_score(y, a["prob"]) - roc_auc_score(y, b["prob"]), abs=1e-9)
    assert d["p_value"] == pytest.approx(p, abs=1e-6)
    assert d["ci_low"] == pytest.approx(diff - 1.959963984540054 * se, abs=1e-6)
    assert d["ci_high"] == pytest.approx(diff + 1.959963984540054 * se, abs=1e-6)
    assert f"p = {d['p_value']:.4g}" in r.stdout and "DeLong" in r.stdout
    # McNemar counts at each run's own validation threshold
    ta = json.loads((trained_run / "run.json").read_text())["threshold"]["value"]
    tb = json.loads((rf_run / "run.json").read_text())["threshold"]["value"]
    ra, rb = (a["prob"].to_numpy() >= ta) == y, (b["prob"].to_numpy() >= tb) == y
    assert res["pairs"][0]["mcnemar"]["a_right_b_wrong"] == int((ra & ~rb).sum())
    assert res["pairs"][0]["mcnemar"]["a_wrong_b_right"] == int((~ra & rb).sum())
    assert (out / "roc.png").stat().st_size > 0 and 'id="delong"' in (out / "compare.html").read_text()


def test_compare_refuses_runs_on_other_cases(trained_run, tmp_path, data_root):
    from medlens.workflow.train import train

    other = train(tiny_config(tmp_path, "fewer", data={"source": "medmnist", "name": "pneumoniamnist", "size": 28,
                                                        "max_samples": 200}, train__epochs=1), progress_bar=False)
    r = medlens("compare", trained_run, other, "--out", tmp_path / "cmp")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "not evaluated on the same cases" in lines[0]
    assert not (tmp_path / "cmp").exists()


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, data_root):
    """A tiny run on a CSV manifest of real X-rays (PNG) with a 'site' column and evaluation.subgroups."""
    from medlens.config import config_from_dict
    from medlens.data.medmnist import load_medmnist
    from medlens.workflow.train import train

    tmp_path = tmp_path_factory.mktemp("csvrun")
    src = load_medmnist("pneumoniamnist").test
    rows = []
    for i in range(240):
        f = tmp_path / "img" / f"x{i:03d}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(src.images[i, 0]).save(f)
        rows.append({"path": f"img/{f.name}", "label": src.class_names[src.labels[i]], "patient_id": f"p{i}",
                     "site": "north" if i % 10 < 7 else ("south" if i % 10 < 9 else "east")})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    cfg = config_from_dict({"name": "sub", "seed": 0, "output_dir": str(tmp_path / "runs"),
                            "data": {"source": "csv", "path": str(tmp_path / "manifest.csv"), "size": 28,
                                     "test_fraction": 0.4},
                            "model": {"name": "small_cnn", "params": {"widths": [8, 16]}},
                            "train": {"epochs": 2, "batch_size": 32, "precision": "32"},
                            "evaluation": {"bootstrap": 50, "subgroups": ["site"]}})
    return train(cfg, progress_bar=False), tmp_path, rows


def test_subgroups_on_a_csv_of_real_images(csv_run):
    """Per-site metrics equal sklearn on predictions.csv; small groups are flagged."""
    run, tmp_path, rows = csv_run
    m = json.loads((run / "metrics.json").read_text())
    test = _preds(run, "test")
    site = {str(tmp_path / r["path"]): r["site"] for r in rows}
    test["site"] = [site[str(Path(s))] for s in test["source"]]
    groups = {g["value"]: g for g in m["subgroups"]["site"]["groups"]}
    assert set(groups) == set(test["site"])
    for name, part in test.groupby("site"):
        assert groups[name]["n"] == len(part)
        if part["label"].nunique() == 2:
            assert groups[name]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(part["label"], part["prob"]))
        assert bool(groups[name]["warnings"]) == (len(part) < 30 or part["label"].nunique() < 2)
    assert any(groups[g]["warnings"] for g in groups)  # 'east' holds ~10% of ~96 test cases: flagged
    assert 'id="subgroups"' in (run / "report.html").read_text()


def test_subgroups_need_a_csv_manifest(tmp_path):
    cfg = {"name": "x", "data": {"source": "medmnist", "name": "pneumoniamnist"}, "evaluation": {"subgroups": ["sex"]}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = medlens("train", p)
    assert r.returncode == 2 and "evaluation.subgroups" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _site_sample(folder: Path, images, labels, names, idx) -> Path:
    rows = []
    for i in idx:
        f = folder / f"s{i:03d}.png"
        Image.fromarray(images[i, 0]).save(f)
        rows.append({"path": f.name, "label": names[labels[i]], "patient_id": f"site-{i}"})
    pd.DataFrame(rows).to_csv(folder / "site.csv", index=False)
    return folder / "site.csv"


def test_recalibrate_on_a_site_sample(trained_run, tmp_path):
    """Official test images the run never scored become a site's sample: calibration and threshold are
    refitted on it into a new run folder; the original run is untouched."""
    from medlens.data.medmnist import load_medmnist
    from medlens.run import Predictor, Run
    from medlens.run.meta import Calibration

    src = load_medmnist("pneumoniamnist").test
    used = {int(s.split("[")[1].rstrip("]")) for s in _preds(trained_run, "test")["source"]}
    idx = [i for i in range(len(src)) if i not in used][:150]
    site = _site_sample(tmp_path, src.images, src.labels, src.class_names, idx)
    before = (trained_run / "run.json").read_bytes()
    r = medlens("recalibrate", trained_run, "--on", site, "--out", tmp_path / "site_run")
    assert r.returncode == 0, r.stderr
    assert (trained_run / "run.json").read_bytes() == before
    meta = json.loads((tmp_path / "site_run" / "run.json").read_text())
    assert meta["threshold"]["chosen_on"] == "site"
    # issue 26: the calibration is chosen inside the site sample too, and recorded as such
    choice = meta["calibration_choice"]
    assert choice["on"] == "site" and choice["n"] == 150
    assert choice["chosen"] == (meta["calibration"]["method"] if meta["calibration"] else "none")
    assert meta["calibration"] is None or meta["calibration"]["fitted_on"] == "site"
    assert meta["recalibrated_on"]["n"] == 150
    # issue 26 (Why 7): the console and the checklist name the site sample, never validation
    assert "chosen on the site sample of 150 cases" in r.stdout
    assert "chosen on validation" not in r.stdout and "fitted on validation" not in r.stdout
    checklist = (tmp_path / "site_run" / "checklist.json").read_text()
    assert "chosen on validation" not in checklist and "chosen on a site's own labelled sample" in checklist
    orig = Run.open(trained_run)
    assert Run.open(tmp_path / "site_run").weights_sha256 == orig.weights_sha256
    pred = Predictor(orig)
    raw = pred.predict_arrays(np.stack([pred.prepare(tmp_path / f"s{i:03d}.png") for i in idx]), calibrated=False)
    y = src.labels[idx]
    p = Calibration.model_validate(meta["calibration"]).apply(raw) if meta["calibration"] else raw
    if meta["calibration"] and meta["calibration"]["method"] == "platt":
        assert abs((y - p).mean()) < 1e-3                     # the maximum-likelihood Platt fit on the site sample
    fpr, tpr, thr = roc_curve(y, p)
    assert meta["threshold"]["value"] == pytest.approx(min(thr[np.argmax(tpr - fpr)], 1.0), abs=1e-6)
    html = (tmp_path / "site_run" / "report.html").read_text()
    assert "the site&#39;s own labelled sample" in html or "the site's own labelled sample" in html


def test_recalibrate_refuses_a_sample_that_overlaps_the_test_split(csv_run, tmp_path):
    run, folder, rows = csv_run
    test = _preds(run, "test")
    pd.DataFrame({"path": [Path(s).relative_to(folder).as_posix() for s in test["source"][:20]],
                  "label": [["normal", "pneumonia"][k] for k in test["label"][:20]]}).to_csv(folder / "site.csv",
                                                                                             index=False)
    r = medlens("recalibrate", run, "--on", folder / "site.csv", "--out", tmp_path / "new")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "shares 20 file(s)" in lines[0] and "site.csv" in lines[0]
    assert not (tmp_path / "new").exists()
