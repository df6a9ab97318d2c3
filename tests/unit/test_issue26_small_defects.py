"""Issue 26, Deliver 7: the smaller defects, each reproduced as a new user met it.

- ``--set train.epochs=1`` on the ViT config (a one-epoch warm-up) was refused: the warm-up is capped by the
  epochs, with a warning, and the capped value is what the config holds;
- ``vgg16`` at 28 px failed inside PyTorch's max-pooling: a one-line error names the model, its minimum and the
  configured size, before anything trains (and ``Run.open``, so ``predict``, builds through the same check).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from medlens.config import config_from_dict, load_config
from medlens.errors import ConfigError, MedlensWarning
from medlens.models import create_model
from tests.clirun import medlens

REPO = Path(__file__).resolve().parents[2]
VIT = REPO / "src" / "medlens" / "configs" / "pneumoniamnist_vit.yaml"


def test_one_epoch_on_the_vit_config_caps_the_warmup_and_says_so():
    assert load_config(VIT).train.warmup_epochs == 1  # the shipped config warms up for one epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(VIT, ["train.epochs=1"])
    assert cfg.train.epochs == 1 and cfg.train.warmup_epochs == 0
    notes = [str(w.message) for w in caught if issubclass(w.category, MedlensWarning)]
    assert len(notes) == 1 and "train.warmup_epochs (1) capped at 0" in notes[0]
    # the capped config is what a run folder records: it loads again without a second note
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        reloaded = config_from_dict(cfg.model_dump())
    assert reloaded.train.warmup_epochs == 0 and not [w for w in again if issubclass(w.category, MedlensWarning)]


def test_warmup_shorter_than_the_epochs_is_kept_without_a_note():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(VIT, ["train.epochs=3"])
    assert cfg.train.warmup_epochs == 1 and not [w for w in caught if issubclass(w.category, MedlensWarning)]


def test_train_cli_accepts_one_epoch_on_the_vit_config():
    r = medlens("train", VIT, "--set", "train.epochs=1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "train.warmup_epochs (1) capped at 0" in r.stdout + r.stderr


@pytest.mark.parametrize("model,size,low", [("vgg16", 28, 32), ("inception_v3", 64, 75),
                                            ("dicom_tutorial_cnn", 8, 10), ("fundus_dr_cnn", 8, 16)])
def test_an_input_below_the_models_minimum_is_one_line_naming_both_sizes(model, size, low):
    with pytest.raises(ConfigError) as e:
        create_model(model, 1, 2, 2, (size, size))
    msg = str(e.value)
    assert f"model '{model}'" in msg and f"at least {low} px" in msg and f"{size}x{size}" in msg
    assert "\n" not in msg
    create_model(model, 1, 2, 2, (low, low))  # the minimum itself builds


def test_vgg16_at_its_minimum_runs_a_forward_pass():
    import torch

    net = create_model("vgg16", 1, 2, 2, (32, 32), dense=16).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


def test_training_vgg16_at_28px_stops_in_one_line_before_fitting(data_root, tmp_path):
    import yaml

    cfg = {"name": "vgg28", "seed": 0, "output_dir": str(tmp_path),
           "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28, "max_samples": 32},
           "model": {"name": "vgg16", "params": {"dense": 16}},
           "train": {"epochs": 1, "batch_size": 16, "precision": "32"}, "evaluation": {"bootstrap": 20}}
    path = tmp_path / "vgg28.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = medlens("train", path, "--quiet")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "vgg16" in ln]
    assert len(lines) == 1 and "at least 32 px" in lines[0] and "28x28" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr
    assert not list((tmp_path / "vgg28").glob("checkpoints/*.ckpt")) and not (tmp_path / "vgg28" / "model.pt").exists()
