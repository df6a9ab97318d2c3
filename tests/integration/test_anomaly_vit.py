"""Issue 18 on real PneumoniaMNIST: a ViT trained through the config path with its attention maps in the
faithfulness table, and an autoencoder anomaly run (normal class only) compared with a supervised run."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import tiny_config
from medlens.errors import ConfigError, MedlensWarning
from medlens.run import Run
from medlens.workflow.train import train

VIT = {"name": "vit", "params": {"patch_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
                                 "num_heads": 4}}


@pytest.mark.slow
def test_vit_trains_and_its_attention_maps_join_the_faithfulness_table(tmp_path, data_root):
    from medlens.explain.run import evaluate_faithfulness, write_report_section
    from medlens.report.html import write_report

    run_dir = train(tiny_config(tmp_path, "vit", model=VIT, train__epochs=1), progress_bar=False)
    run = Run.open(run_dir)
    assert run.meta.model == "vit" and (run_dir / "model.pt").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["metrics"]["auc"]["value"] > 0.5
    methods = ["gradcam", "attention_rollout", "attention_gradcam"]
    rows = evaluate_faithfulness(run, methods, n=12, sanity_n=4)
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 and np.isfinite(r["randomisation_spearman"])
    write_report_section(run, "attention_rollout")
    html = write_report(run_dir).read_text()
    assert "Method: <b>attention_rollout</b>" in html and "<td class=\"l\">attention_gradcam</td>" in html


def _anomaly_cfg(tmp, name, **over):
    sections = {"data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 300,
                         "normalize": "none"},
                "model": {"name": "autoencoder"}, "train": {"epochs": 1, "batch_size": 64, "precision": "32"}}
    return tiny_config(tmp, name, task="anomaly", **(sections | over))


@pytest.mark.slow
def test_anomaly_run_learns_normals_only_and_reports_beside_the_supervised_run(tmp_path, trained_run):
    from medlens.evaluation.evaluate import evaluate_run
    from medlens.transforms.preprocess import prepared_data

    lines = []
    cfg = _anomaly_cfg(tmp_path, "anom", anomaly={"score": "mse", "compare_run": str(trained_run)})
    run_dir = train(cfg, progress_bar=False, log=lines.append)
    run = Run.open(run_dir)
    data = prepared_data(cfg.data, seed=0)
    n_normal = int((data.train.labels == 0).sum())
    assert run.meta.anomaly["train_images"] == n_normal < len(data.train)  # the pneumonia images were left out
    assert run.meta.anomaly["score"] == "mse" and run.meta.threshold.chosen_on == "val"
    # the reported test AUC is the AUC of the plain reconstruction MSE (sklearn, computed here from the weights)
    net = run.model
    x, y = data.test.batch(np.arange(len(data.test)))
    with torch.no_grad():
        recon = net.net.reconstruct(x).numpy()
    mse = ((x.numpy() - recon) ** 2).reshape(len(x), -1).mean(1)
    want = roc_auc_score(y.numpy(), mse)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["metrics"]["auc"]["value"] == pytest.approx(want, abs=1e-6)
    scores = {r["score"]: r for r in json.loads((run_dir / "anomaly_scores.json").read_text())}
    assert set(scores) == {"mse", "l1", "ssim"} and scores["mse"]["test_auc"] == pytest.approx(want, abs=1e-6)
    # `medlens evaluate` on the run folder reproduces it
    assert evaluate_run(Run.open(run_dir))["test"]["metrics"]["auc"]["value"] == pytest.approx(want, abs=1e-6)
    sup = json.loads((trained_run / "metrics.json").read_text())["test"]["metrics"]["auc"]
    assert any(f"supervised shared (small_cnn) {sup['value']:.3f}" in ln and f"{want:.3f}" in ln for ln in lines)
    html = (run_dir / "report.html").read_text()
    assert "What labels buy" in html and html.count("data:image/png;base64") >= 3
    section = json.loads((run_dir / "report_sections" / "anomaly.json").read_text())["data"]
    assert section["comparison"]["available"] and section["comparison"]["auc"] == pytest.approx(sup["value"])
    assert any("supervised p=" in c["caption"] for g in section["groups"] for c in g["cases"])


def test_missing_supervised_run_is_a_clear_warning(tmp_path):
    from medlens.run import RunMeta
    from medlens.workflow.anomaly import supervised_comparison

    cfg = _anomaly_cfg(tmp_path, "anom", anomaly={"compare_run": str(tmp_path / "nowhere")})
    meta = RunMeta.model_validate({"task": "binary", "model": "autoencoder", "in_channels": 1, "n_outputs": 1,
                                   "input_size": [28, 28], "class_names": ["normal", "pneumonia"],
                                   "preprocessing": {"spatial_dims": 2, "mean": [0.0], "std": [1.0]}})
    lines = []
    with pytest.warns(MedlensWarning, match="supervised run not found; train it first"):
        out = supervised_comparison(cfg, meta, lines.append)
    assert out["available"] is False and "nowhere" in lines[0]


@pytest.mark.parametrize("over, msg", [({"model": {"name": "small_cnn"}}, "not an anomaly model"),
                                       ({"anomaly": {"normal_class": "healthy"}}, "'healthy' is not one of"),
                                       ({"anomaly": {"normal_class": "pneumonia"}}, "is the positive class")])
def test_bad_anomaly_configs_fail_in_one_line(tmp_path, data_root, over, msg):
    with pytest.raises(ConfigError, match=msg):
        train(_anomaly_cfg(tmp_path, "bad", **over), progress_bar=False)
