"""Issue 19 fixes: configs and templates in the wheel, outputs with the user's umask, a nodule in both CSVs
extracted once, label mapping and the positive class, new optimisers and shear, the epochs cap."""

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medlens.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_configs_and_every_template(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("medlens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"medlens/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert len(shipped) >= 10 and shipped <= names
    templates = {f"medlens/{p.relative_to(REPO / 'src' / 'medlens').as_posix()}"
                 for p in (REPO / "src" / "medlens" / "report" / "templates").rglob("*.html")}
    assert "medlens/report/templates/sections/explanations.html" in templates and templates <= names


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, mask):
    from medlens.utils import atomic_dir, write_text_atomic

    old = os.umask(mask)
    try:
        f = write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


def test_a_nodule_in_both_csvs_is_one_positive():
    from medlens.data.nodules import merge_positives

    ann = np.array([[56.21, 86.34, -115.87]])
    cand = np.array([[57.0, 85.5, -116.5],     # the annotated nodule again (1.3 mm away, radius 11.7 mm)
                     [57.2, 85.9, -115.0],     # and again
                     [-80.0, 40.0, -150.0],    # a second nodule, only in the candidates
                     [-81.0, 40.5, -150.5]])   # that one again (within 5 mm)
    out = merge_positives(ann, np.array([23.35]), cand)
    np.testing.assert_array_equal(out, [[56.21, 86.34, -115.87], [-80.0, 40.0, -150.0]])
    assert len(merge_positives(ann, np.array([np.nan]), cand[:1])) == 1  # no diameter: 5 mm


def test_label_map_and_positive_class(data_root):
    from medlens.config import config_from_dict
    from medlens.data import build_data

    raw = np.load(data_root / "medmnist" / "retinamnist.npz")["test_labels"].reshape(-1)
    cfg = config_from_dict({"data": {"name": "retinamnist", "label_map": {0: "No DR", 1: None, 2: None, 3: "Severe",
                                                                          4: "Severe"}, "positive_class": "Severe"}})
    test = build_data(cfg.data).test
    assert test.task == "binary" and test.class_names == ["No DR", "Severe"]
    assert len(test) == int(np.isin(raw, [0, 3, 4]).sum())
    assert int(test.labels.sum()) == int(np.isin(raw, [3, 4]).sum())
    # choosing the other class as positive swaps the order and the labels
    cfg2 = config_from_dict({"data": {"name": "pneumoniamnist", "positive_class": "normal"}})
    d2 = build_data(cfg2.data).test
    raw2 = np.load(data_root / "medmnist" / "pneumoniamnist.npz")["test_labels"].reshape(-1)
    assert d2.class_names == ["pneumonia", "normal"] and np.array_equal(d2.labels, 1 - raw2)
    with pytest.raises(DataError, match="does not say what source label"):
        build_data(config_from_dict({"data": {"name": "retinamnist", "label_map": {0: "a", 1: "b"}}}).data)
    with pytest.raises(ConfigError, match="positive_class"):
        config_from_dict({"data": {"name": "retinamnist", "label_map": {0: "a", 1: "b", 2: None, 3: None, 4: None},
                                   "positive_class": "c"}})


def test_optimisers_shear_and_epochs_cap(monkeypatch):
    from medlens.config import config_from_dict, load_config
    from medlens.engine.module import ClassifierModule, ClassifierNet
    from medlens.transforms.augment import BatchAugment

    net = ClassifierNet(torch.nn.Linear(4, 1), [0.0], [1.0])
    for opt, cls, check in (("rmsprop", torch.optim.RMSprop, lambda g: g["alpha"] == 0.9 and g["momentum"] == 0),
                            ("sgd", torch.optim.SGD, lambda g: g["momentum"] == 0.5 and g["nesterov"])):
        over = {"optimizer": opt, "scheduler": "none"} | ({"momentum": 0.5} if opt == "sgd" else {})
        o = ClassifierModule(net, "binary", config_from_dict({"data": {"name": "pneumoniamnist"}, "train": over}).train).configure_optimizers()
        assert isinstance(o, cls) and check(o.param_groups[0])
    # a shear moves a vertical line's rows by different amounts; a horizontal line stays horizontal
    aug = BatchAugment(config_from_dict({"data": {"name": "pneumoniamnist"}, "train": {"augment": {"shear": 30}}}).train.augment)
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, :, 16] = 1
    y = aug(x, torch.Generator().manual_seed(0))
    cols = y[0, 0].argmax(1)
    assert aug.last_params["geometric"].shear.abs().item() > 0 and cols[4] != cols[28]
    monkeypatch.setenv("MEDLENS_MAX_EPOCHS", "2")
    assert load_config(REPO / "configs" / "retinamnist_dr_seed.yaml").train.epochs == 2
    monkeypatch.setenv("MEDLENS_MAX_EPOCHS", "two")
    with pytest.raises(ConfigError, match="MEDLENS_MAX_EPOCHS"):
        load_config(REPO / "configs" / "retinamnist_dr_seed.yaml")
