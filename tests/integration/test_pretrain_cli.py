"""`medlens pretrain` on pooled real MedMNIST training images (gray chest X-rays + RGB fundus photographs), then
`medlens train` of a config that loads the backbone through `model.pretrained` with `freeze: [backbone]`."""

from __future__ import annotations

import json

import torch
import yaml

from clirun import medlens

WIDTHS = [8, 16, 32]


def test_pretrain_then_finetune_loads_and_freezes_backbone(tmp_path, data_root):
    bb = tmp_path / "backbone.pt"
    r = medlens("pretrain", "pneumoniamnist", "retinamnist", "--method", "simclr", "--model", "small_cnn",
                "--params", json.dumps({"widths": WIDTHS}), "--max-per-dataset", "150", "--epochs", "1",
                "--batch-size", "64", "--out", bb, "--seed", "0", check=True)
    assert "train splits only" in r.stdout and "validation and test" in r.stdout
    side = json.loads(bb.with_suffix(".json").read_text())
    assert side["n_images"] == 300 and side["channels"] == 1  # the first dataset's (gray); RGB converted
    assert [d["name"] for d in side["datasets"]] == ["pneumoniamnist", "retinamnist"]
    assert all(d["split"] == "train" for d in side["datasets"])
    backbone = torch.load(bb, map_location="cpu", weights_only=True)
    assert side["n_tensors"] == len(backbone)

    cfg = {"name": "ft", "seed": 0, "output_dir": str(tmp_path / "runs"),
           "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 200},
           "model": {"name": "small_cnn", "params": {"widths": WIDTHS}, "pretrained": str(bb),
                     "freeze": ["backbone"]},
           "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "precision": "32"},
           "evaluation": {"bootstrap": 20}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    medlens("train", tmp_path / "ft.yaml", check=True)
    run = tmp_path / "runs" / "ft"
    transfer = json.loads((run / "run.json").read_text())["transfer"]
    assert transfer["loaded"] == len(backbone) and transfer["n_skipped"] == 0 and transfer["adapted"] == []
    n_backbone_params = sum(1 for k in backbone if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked")))
    assert transfer["frozen"] == n_backbone_params
    trained = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    # frozen: weights and BatchNorm statistics unchanged by training; only the head is outside the backbone
    assert all(torch.equal(trained["net." + k], v) for k, v in backbone.items())
    assert sorted(k for k in trained if k.startswith("net.") and k[4:] not in backbone) == [
        "net.head.2.bias", "net.head.2.weight"]
