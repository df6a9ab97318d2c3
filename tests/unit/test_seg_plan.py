"""Segmentation plans (issue 30 item 6): the rules of ``engine.seg_planner`` against values worked out by hand,
the fingerprint of tiny synthetic pairs, the same plan twice, the real CHASE_DB1 folder's fingerprint decisions
and the refusal of a folder without masks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from clirun import medlens
from medlens.config import SegmentationConfig, config_from_dict, dump_config
from medlens.engine.seg_planner import (
    SegFingerprint,
    SegIntensity,
    SegPlanner,
    fitted_patch,
    network_for,
    seg_fingerprint,
)
from medlens.transforms.preprocess import prepared_segmentation
from medlens.workflow.plan import make_plan
from medlens.workflow.seg_plan import detect_pairs, is_segmentation_input


def _fp(dims: int, spacings: list[list[float]], shape: list[int], modality: str = "MR", share: float = 0.05,
        p10: list[float] | None = None) -> SegFingerprint:
    sp = np.array(spacings)
    return SegFingerprint(
        source="folder", location="x", spatial_dims=dims, channels=1, n={"train": len(spacings), "val": 2, "test": 2},
        shapes=[shape] * len(spacings), spacings=spacings, median_shape=shape,
        median_spacing=np.median(sp, 0).tolist(), spacing_p10=p10 or np.percentile(sp, 10, axis=0).tolist(),
        modality=modality, intensity=SegIntensity(mean=40, std=30, p005=-80, p995=160, min=-100, max=300,
                                                  integer=True),
        channel_separation={}, n_classes=2, class_names=["background", "foreground"], foreground_share=share,
        class_shares=[1 - share, share], patients_known=False)


def test_2d_rules_by_hand():
    # 150 px: pooled while >= 8 px: 150, 75, 37.5, 18.75, 9.4 -> 5 pools (stride 32) -> 128 px, whose 5 pools end at 4
    assert fitted_patch([150, 150], [1.0, 1.0]) == ([128, 128], [[2, 2]] * 5)
    steps, total = network_for([160, 64], [1.0, 1.0])   # 64: 4 pools (64, 32, 16, 8); 160: a fifth (at 10 px)
    assert total == [32, 16] and steps == [[2, 2]] * 4 + [[2, 1]]
    pl = SegPlanner(_fp(2, [[1.0, 1.0]] * 4, [300, 280], modality="OT", share=0.05), 600)
    pl.plan_from_fingerprint()
    assert pl.target_spacing == [1.0, 1.0]
    assert pl.data["intensity"] == "zscore" and pl.data["window"] is None     # not CT: per-image z-score
    assert pl.seg["loss"] == "dice_ce" and pl.seg["foreground_ratio"] == 0.33  # 5% foreground
    assert pl.train["augment"]["rot90"] is True
    # a CT with a rare foreground: window = the foreground's 0.5-99.5 percentiles (-80..160 HU), oversampling 1/2
    ct = SegPlanner(_fp(2, [[1.0, 1.0]] * 4, [300, 280], modality="CT", share=0.0005), 600)
    ct.plan_from_fingerprint()
    assert ct.data["window"] == "40.0,240.0" and ct.data["normalize"] == "dataset"
    assert ct.seg["loss"] == "dice_focal" and ct.seg["foreground_ratio"] == 0.5
    names = [d.setting for d in ct.decisions]
    assert {"plan.target_spacing", "data.intensity", "segmentation.loss", "segmentation.foreground_ratio"} <= set(names)


def test_3d_anisotropic_rules_by_hand():
    spacings = [[5.0, 0.8, 0.8], [5.0, 0.8, 0.8], [4.0, 0.8, 0.8], [6.0, 0.8, 0.8], [2.0, 0.8, 0.8]]
    pl = SegPlanner(_fp(3, spacings, [40, 200, 200]), 600)
    pl.determine_target_spacing()
    # z median 5.0 > 3 x 0.8: anisotropic -> its 10th percentile: sorted 2, 4, 5, 5, 6 -> 2 + 0.4 x (4 - 2) = 2.8
    assert pl.target_spacing == pytest.approx([2.8, 0.8, 0.8])
    assert pl.median_shape_at_target == [71, 200, 200]      # 40 slices of 5 mm at 2.8 mm
    # depth per axis at [2.8, 0.8, 0.8]: z waits until y/x reach 1.6 mm, then pools twice (16 -> 8 -> 4 px);
    # y and x pool five times (128 -> 4 px)
    steps, total = network_for([16, 128, 128], pl.target_spacing)
    assert steps == [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]] and total == [4, 32, 32]
    params = pl.unet_params([16, 128, 128])
    assert params["strides"] == steps and len(params["channels"]) == 6
    assert "dflip" not in pl.determine_augmentation()    # no mirroring across the thick slices


def _write_2d_pairs(folder: Path, n: int, size: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        y, x = rng.integers(8, size - 16, 2)
        m[y:y + 10, x:x + 12] = 255
        img = (rng.normal(80, 10, (size, size)) + (m > 0) * 90).clip(0, 255).astype(np.uint8)
        PILImage.fromarray(img).save(folder / f"case{i:02d}.png")
        PILImage.fromarray(m).save(folder / f"case{i:02d}_mask.png")


def test_3d_fingerprint_of_synthetic_volumes(tmp_path):
    # four volumes (12 x 16 x 16), z spacing 4, 4, 5, 1 mm, in-plane 1 mm; a 2 x 4 x 4 foreground box each
    root = tmp_path / "vols"
    root.mkdir()
    zs = [4.0, 4.0, 5.0, 1.0]
    for i, z in enumerate(zs):
        aff = np.diag([1.0, 1.0, z, 1.0])        # NIfTI: x, y, z
        vol = np.full((16, 16, 12), 100, np.int16)
        lab = np.zeros((16, 16, 12), np.uint8)
        lab[4:8, 4:8, 5:7] = 1
        vol[lab > 0] = 300 + i
        nib.save(nib.Nifti1Image(vol, aff), root / f"s{i}_img.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / f"s{i}_seg.nii.gz")
    pairs = detect_pairs(root)
    assert pairs == {"image_suffix": "_img", "mask_suffix": "_seg.nii.gz"}
    cfg = config_from_dict({"task": "segmentation", "data": {"source": "folder", "path": str(root), **pairs,
                                                             "val_fraction": 0.25, "test_fraction": 0.25,
                                                             "store": str(tmp_path / "store")}})
    split = prepared_segmentation(cfg.data, SegmentationConfig(patch_size=[8, 8, 8]), seed=0)
    fp = seg_fingerprint(split, "folder", str(root), None)
    z_train = sorted(s[0] for s in fp.spacings)
    assert fp.spatial_dims == 3 and fp.median_shape == [12, 16, 16] and fp.n == {"train": 2, "val": 1, "test": 1}
    assert fp.median_spacing[0] == pytest.approx(float(np.median(z_train)))
    assert fp.spacing_p10[0] == pytest.approx(z_train[0] + 0.1 * (z_train[1] - z_train[0]))
    assert fp.foreground_share == pytest.approx(32 / (12 * 16 * 16), abs=1e-6)   # 2 x 4 x 4 of 3072 voxels
    assert fp.intensity.integer and 300 <= fp.intensity.min <= fp.intensity.max <= 303   # inside the foreground


def test_same_plan_twice_and_it_trains_as_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLENS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "pairs"
    _write_2d_pairs(folder, 10)
    assert is_segmentation_input(folder) and not is_segmentation_input(tmp_path / "missing")
    a = make_plan(folder, "2m", seed=0)
    b = make_plan(folder, "2m", seed=0)
    assert dump_config(a) == dump_config(b)
    assert a.task == "segmentation" and a.model.name == "unet" and a.data.mask_suffix == "_mask.png"
    p = a.plan or {}
    settings = {d["setting"] for d in p["decisions"]}
    assert {"plan.target_spacing", "segmentation.patch_size", "model", "train.batch_size", "train.epochs",
            "segmentation.foreground_ratio", "segmentation.loss", "data.intensity", "train.precision"} <= settings
    # 48 px images: at most the median shape, a multiple of each axis' total stride; 48 px pools 3 times (to 6 px)
    strides = np.array(a.model.params["strides"]).reshape(len(a.model.params["channels"]) - 1, -1)
    total = strides.prod(0) if strides.shape[1] == 2 else np.full(2, 2 ** len(strides))
    assert all(p <= 48 and p % t == 0 for p, t in zip(a.segmentation.patch_size, total))
    assert 3 <= len(strides) <= 4 and a.model.params["channels"][:2] == [16, 32]
    assert p["estimates"]["total_s"] <= p["budget_seconds"]
    assert a.train.epochs * a.segmentation.patches_per_epoch >= a.train.batch_size


def test_real_chase_folder_fingerprint_decisions(data_root):
    folder = data_root / "chasedb1" / "CHASEDB1"
    pairs = detect_pairs(folder)
    assert pairs == {"image_suffix": "", "mask_suffix": "_1stHO.png", "reference_suffix": "_2ndHO.png"}
    cfg = config_from_dict({"task": "segmentation", "data": {"source": "folder", "path": str(folder), **pairs,
                                                             "patient_pattern": "Image_(\\d+)[LR]"}})
    split = prepared_segmentation(cfg.data, SegmentationConfig(), seed=0)
    fp = seg_fingerprint(split, "folder", str(folder), None, max_cases=4)
    assert fp.spatial_dims == 2 and fp.channels == 3 and fp.median_shape == [960, 999]
    assert 0.03 < fp.foreground_share < 0.15        # retinal vessels: a few percent of the pixels
    pl = SegPlanner(fp, 600)
    pl.plan_from_fingerprint()
    by = {d.setting: d for d in pl.decisions}
    # the vessels stand out from the band around them best in the green channel after CLAHE
    sep = fp.channel_separation
    assert max(sep, key=lambda k: sep[k]) == "green+clahe" and sep["green"] > sep["red"]
    assert by["data.color"].value == "green" and by["data.clahe"].value is True
    assert by["segmentation.foreground_ratio"].value == 0.33 and by["segmentation.loss"].value == "dice_ce"
    assert all(d.reason for d in pl.decisions)


def test_folder_without_masks_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        PILImage.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"img_{i}.png")
    r = medlens("plan", folder, "--budget", "5m", "--out", tmp_path / "plan.yaml")
    assert r.returncode != 0 and not (tmp_path / "plan.yaml").exists()
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "photos" in lines[0] and "no masks" in lines[0]


def test_no_dataset_name_in_the_segmentation_planner():
    from medlens.data.catalog import MEDMNIST

    names = set(MEDMNIST) | {i.name for i in MEDMNIST.values()}
    src = Path(__file__).resolve().parents[2] / "src" / "medlens"
    for f in (src / "engine" / "seg_planner.py", src / "workflow" / "seg_plan.py"):
        text = f.read_text().lower()
        assert "pneumoniamnist" in names and not [n for n in sorted(names) if n in text], f.name
