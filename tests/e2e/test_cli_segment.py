"""``medlens train`` with a segmentation config and ``medlens segment``, run as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from servehelp import chase_subset
from test_cli import _one_line_error, medlens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("segcli")
    chase = chase_subset(out / "chase", masks=("_1stHO.png", "_2ndHO.png"))   # 4 children: 2 train, 1 val, 1 test
    r = medlens("train", REPO / "configs" / "chasedb1_unet.yaml", "--quiet", "--set", f"output_dir={out}",
                "--set", f"data.path={chase}", "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25",
                "--set", "train.epochs=1", "--set", "segmentation.patches_per_epoch=32",
                "--set", "model.params={channels: [8, 16, 32]}", "--set", "evaluation.bootstrap=20", check=True)
    assert "Dice" in r.stdout and "second observer" in r.stdout and "HD95 (px)" in r.stdout
    return out / "chasedb1_unet"


def test_segment_command(seg_run, data_root, tmp_path):
    src = data_root / "chasedb1" / "CHASEDB1" / "Image_11R.jpg"
    r = medlens("segment", seg_run, src, "--out", tmp_path / "masks", check=True)
    mask = tmp_path / "masks" / "Image_11R_mask.png"
    assert mask.exists() and (tmp_path / "masks" / "Image_11R_overlay.png").exists()
    assert np.asarray(Image.open(mask)).shape == (960, 999)
    assert "Image_11R.jpg" in r.stdout
    _one_line_error(medlens("segment", seg_run, tmp_path / "nope.png", "--out", tmp_path / "m2"), "nope.png")
    _one_line_error(medlens("predict", seg_run, src), "a segmentation run", "medlens segment")
    _one_line_error(medlens("explain", seg_run, src), "a segmentation run")
    r = medlens("evaluate", seg_run, check=True)
    assert "Dice" in r.stdout and json.loads((seg_run / "metrics.json").read_text())["task"] == "segmentation"


def test_segment_with_a_classifier_run_is_refused(trained_run, tmp_path, data_root):
    src = data_root / "chasedb1" / "CHASEDB1" / "Image_11R.jpg"
    _one_line_error(medlens("segment", trained_run, src, "--out", tmp_path), "not a segmentation run")


def _pairs(folder: Path, n: int = 4, bad: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((48, 48)) * 255).astype(np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        mask[10:20, 10:30] = 255
        if bad == "grid" and i == 2:
            mask = np.zeros((48, 40), np.uint8)
        if bad == "labels" and i == 2:
            mask[0, 0] = 7
        Image.fromarray(img).save(folder / f"case{i}.png")
        Image.fromarray(mask).save(folder / f"case{i}_seg.png")


def _cfg(tmp: Path, folder: Path, **model) -> Path:
    import yaml

    d = {"name": "synth", "task": "segmentation", "output_dir": str(tmp / "runs"),
         "data": {"source": "folder", "path": str(folder), "mask_suffix": "_seg.png", "val_fraction": 0.25,
                  "test_fraction": 0.25},
         "model": {"name": model.get("name", "unet"), "params": {"channels": [4, 8]} if not model else {}},
         "segmentation": {"patch_size": [64, 64], "patches_per_epoch": 4},
         "train": {"epochs": 1, "batch_size": 2, "precision": "32"}, "evaluation": {"bootstrap": 10}}
    p = tmp / "seg.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_bad_masks_and_configs_are_one_line_errors(tmp_path):
    _pairs(tmp_path / "grid", bad="grid")
    _one_line_error(medlens("train", _cfg(tmp_path, tmp_path / "grid"), "--quiet"), "case2_seg.png",
                    "mask grid (48, 40) differs from its image's (48, 48)")
    _pairs(tmp_path / "labels", bad="labels")
    _one_line_error(medlens("train", _cfg(tmp_path, tmp_path / "labels"), "--quiet", "--overwrite"),
                    "case2_seg.png", "not binary")
    _pairs(tmp_path / "ok")
    _one_line_error(medlens("train", _cfg(tmp_path, tmp_path / "ok", name="small_cnn"), "--quiet", "--overwrite"),
                    "classifier")
    cfg = _cfg(tmp_path, tmp_path / "ok")
    _one_line_error(medlens("train", cfg, "--quiet", "--overwrite", "--set", "segmentation.patch_size=[64]"),
                    "patch_size")
    _one_line_error(medlens("train", cfg, "--quiet", "--overwrite", "--set", "data.mask_suffix=_none.png"),
                    "no masks matching")
    _one_line_error(medlens("train", cfg, "--quiet", "--overwrite", "--set", "train.monitor=val_loss"),
                    "segmentation runs monitor val_dice")


def test_small_images_train_with_a_padding_warning(tmp_path):
    _pairs(tmp_path / "ok")
    r = medlens("train", _cfg(tmp_path, tmp_path / "ok"), "--quiet", check=True)
    assert "smaller than the patch" in r.stderr + r.stdout
    masks = list((tmp_path / "runs" / "synth" / "predictions").glob("*_mask.png"))
    assert len(masks) == 1 and np.asarray(Image.open(masks[0])).shape == (48, 48)


def test_segmentation_report_renders_in_chromium(seg_run, tmp_path):
    from test_report_browser import _chromium

    report = seg_run / "report.html"
    dom = _chromium("--dump-dom", report.as_uri(), tmp_path=tmp_path).stdout
    assert "id=\"seg-metrics\"" in dom and "second observer" in dom and "id=\"seg-cases\"" in dom
    assert "HD95 (px)" in dom and "resamples of the test patients" in dom
    assert dom.count("data:image/png;base64,") >= 3  # training curves + the overlays of both test eyes (one child)
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri(), tmp_path=tmp_path)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 20 and (img < 128).mean() > 0.01
