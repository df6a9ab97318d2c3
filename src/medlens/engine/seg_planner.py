"""The planning rules of segmentation plans (issue 30 item 6): nnU-Net's ``ExperimentPlanner`` shape, one
``determine_*`` method per decision, each recorded with its reason (``engine.planner.Decision``).

``SegPlanner`` reads a ``SegFingerprint`` (spacings, shapes, intensities inside the foreground, foreground share,
classes; ``seg_fingerprint``) and the speeds measured on this machine (``probe_segmentation``: real patch training
steps and one whole-image sliding-window inference, cached per machine and workload by
``engine.probe.MachineFigures``). ``workflow.seg_plan.make_seg_plan`` orchestrates.

The rules (docs/auto.md, "Segmentation plans"):

- target spacing: the median spacing per axis; along an anisotropic axis (median spacing > 3x the finest) its 10th
  percentile (nnU-Net). medlens trains on the native grid (there is no resampling step): the patch and depth are
  computed at the target spacing, and the decision says how far the cases' spacings are from it;
- patch: starts at the median shape and shrinks its largest axis (in mm) until the planned training, at the measured
  speed, gives every step ``MIN_BATCH`` patches and the fit ``TARGET_STEPS`` steps;
- depth per axis (``network_for``): an axis is pooled while its feature map is >= 8 px (it ends at 4-7 px) and its
  spacing is at most twice the finest one (nnU-Net's ``get_pool_and_conv_props``); the patch is rounded down to a
  multiple of each axis' total stride; widths 16, doubling per level up to ``MAX_WIDTH``;
- batch: what the budget buys at ``TARGET_STEPS`` steps, at least ``MIN_BATCH``, at most 5% of the training voxels
  per step (nnU-Net) and ``MAX_BATCH``;
- foreground oversampling 1/3 (nnU-Net), 1/2 when the foreground holds under 1% of the voxels; loss Dice + CE,
  Dice + focal under 0.1%;
- intensity: CT clipped to the foreground's 0.5-99.5 percentiles, then z-scored over the training set; others a
  per-image z-score; a colour photograph keeps its channels unless one channel separates foreground from
  background clearly best (Fisher's criterion, measured);
- epochs: ``STEPS_PER_EPOCH`` steps each, as many as the budget buys from the measured step and validation times.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
import numpy as np
import torch
from scipy import ndimage
from pydantic import BaseModel, ConfigDict
from torch.utils.data import DataLoader, Dataset

from medlens.data.segmentation import PatchSampler, SegCase, SegSplit
from medlens.engine.inference import predict_probs
from medlens.engine.planner import EPOCH_FIXED_S, STARTUP_S, Decision, format_seconds
from medlens.engine.probe import ProbeResult
from medlens.engine.segmentation import SegmentationModule
from medlens.engine.train import build_network
from medlens.errors import ConfigError
from medlens.io import load
from medlens.transforms.intensity import clahe

SEG_PLANNER_VERSION = 1
ANISOTROPY = 3.0          # an axis whose median spacing is > 3x the finest one is anisotropic (nnU-Net)
MIN_FEATURE = 4           # the bottleneck's feature map: pooled while >= 2 x this (ends at 4-7 px)
MAX_POOLS = 6
BASE_WIDTH = 16           # nnU-Net's 32 halved: CPU training steps cost ~4x less
MAX_WIDTH = {2: 256, 3: 320}
MIN_BATCH = {2: 8, 3: 2}  # nnU-Net's minimum is 2; 2D patches are small enough for a larger floor
MAX_BATCH = {2: 32, 3: 8}
BATCH_SHARE = 0.05        # a step sees at most 5% of the training voxels (nnU-Net)
TARGET_STEPS = 3000       # optimiser steps the fit should get before the patch may grow
STEPS_PER_EPOCH = 50      # nnU-Net's 250 shortened: validations often enough to choose the best epoch
MIN_PATCH = {2: 32, 3: 16}
# the planned fit uses this share of what the budget leaves for fitting: on CHASE_DB1 (4m budget) the fit ran 12% over
# its estimate (181 s for 162 s) while planning and evaluation came in under theirs; at 0.85 the run used 82% of its
# budget (197 of 240 s)
SAFETY = 0.92
VAL_SHARE = 0.1           # whole-image validations take at most this share of the fit
# after fitting, besides predicting the cases: threshold search, bootstrap CIs, plots, report (measured: the CHASE_DB1
# hand config's evaluation and report took 12.7 s for 12 cases of 960 x 999 px with clDice on the 2-core machine)
POST_FIXED_S = 10.0
POST_PER_CASE_S = 0.5     # per evaluated case: surface distances, overlays


class SegIntensity(BaseModel):
    """Raw intensities inside the training masks' foreground (a seeded sample of voxels, channels pooled)."""

    model_config = ConfigDict(extra="forbid")
    mean: float
    std: float
    p005: float
    p995: float
    min: float
    max: float
    integer: bool                 # every sampled value whole (HU, 8-bit pictures)


class SegFingerprint(BaseModel):
    """What the segmentation planner knows about a dataset (measured, never named)."""

    model_config = ConfigDict(extra="forbid")
    source: str
    location: str
    spatial_dims: int
    channels: int                  # of the raw files (3: colour photographs)
    n: dict[str, int]              # cases per split
    shapes: list[list[int]]        # training cases' grids (z, y, x) / (y, x)
    spacings: list[list[float]]    # their spacings, same order
    median_shape: list[int]
    median_spacing: list[float]
    spacing_p10: list[float]
    modality: str                  # data.modality, else the files' (OT when they do not say)
    intensity: SegIntensity
    # 2D 8-bit pictures: Fisher's criterion of foreground against the 3-px band around it, per candidate input
    # (gray, red, green, blue; gray+clahe, green+clahe)
    channel_separation: dict[str, float]
    n_classes: int                 # background included
    class_names: list[str]
    foreground_share: float        # share of training voxels that are foreground (any class)
    class_shares: list[float]      # per class, background first
    patients_known: bool


def seg_fingerprint(split: SegSplit, source: str, location: str, modality: str | None, seed: int = 0,
                    max_cases: int = 12, voxels_per_case: int = 20000) -> SegFingerprint:
    """The fingerprint of a loaded split: shapes and spacings of every training case, class shares of every
    training mask, raw intensities (read again from the files) inside the foreground of up to ``max_cases``
    seeded training cases."""
    tr = split.train
    rng = np.random.default_rng(seed)
    shapes = [list(c.grid) for c in tr]
    spacings = [[round(float(s), 5) for s in c.spacing][-len(c.grid):] for c in tr]
    dims = tr[0].dims
    n_cls = len(split.class_names)
    counts = np.zeros(n_cls, np.int64)
    for c in tr:
        counts += np.bincount(c.mask.reshape(-1), minlength=n_cls)[:n_cls]
    pick = sorted(rng.choice(len(tr), min(len(tr), max_cases), replace=False).tolist())
    fg_vals, mods, integer, rgb = [], set(), True, False
    sep: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for i in pick:
        img = load(tr[i].path)
        mods.add(img.modality)
        rgb = rgb or img.is_rgb
        raw = np.asarray(img.array)
        a = raw.astype(np.float32)
        m = tr[i].mask > 0
        chans = a.reshape(-1, a.shape[-1]) if img.is_rgb else a.reshape(-1, 1)
        fg_idx = np.flatnonzero(m.reshape(-1))
        fg = rng.choice(fg_idx, min(len(fg_idx), voxels_per_case), replace=False) if len(fg_idx) else fg_idx
        v = chans[fg].reshape(-1)
        fg_vals.append(v)
        integer = integer and bool(np.all(v == np.round(v)))
        if img.spatial_dims == 2 and raw.dtype == np.uint8 and len(fg_idx):
            for name, col in _candidate_inputs(raw, img.is_rgb).items():
                sep.setdefault(name, []).append(_near(col, m, rng, voxels_per_case))
    vals = np.concatenate(fg_vals) if fg_vals else np.zeros(1, np.float32)
    if not len(vals):
        vals = np.zeros(1, np.float32)
    separation = {k: round(_fisher(np.concatenate([f for f, _ in v]), np.concatenate([b for _, b in v])), 4)
                  for k, v in sep.items()}
    sp = np.array(spacings, np.float64)
    mod = modality or next((m for m in sorted(mods) if m and m != "OT"), "OT")
    total = max(int(counts.sum()), 1)
    return SegFingerprint(
        source=source, location=location, spatial_dims=dims,
        channels=3 if rgb else 1,
        n={"train": len(tr), "val": len(split.val), "test": len(split.test)},
        shapes=shapes, spacings=spacings,
        median_shape=[int(x) for x in np.median(np.array(shapes), 0)],
        median_spacing=[round(float(x), 5) for x in np.median(sp, 0)],
        spacing_p10=[round(float(x), 5) for x in np.percentile(sp, 10, axis=0)],
        modality=mod,
        intensity=SegIntensity(mean=float(vals.mean()), std=float(vals.std()),
                               p005=float(np.percentile(vals, 0.5)), p995=float(np.percentile(vals, 99.5)),
                               min=float(vals.min()), max=float(vals.max()), integer=integer),
        channel_separation=separation, n_classes=n_cls, class_names=list(split.class_names),
        foreground_share=round(float(counts[1:].sum() / total), 6),
        class_shares=[round(float(x / total), 6) for x in counts], patients_known=split.patients_known)


def _candidate_inputs(raw: np.ndarray, rgb: bool) -> dict[str, np.ndarray]:
    """The single-channel inputs a 2D 8-bit picture could be trained on, with and without CLAHE."""
    gray = (raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8) \
        if rgb else raw
    cols = {"gray": gray}
    if rgb:
        cols.update(red=raw[..., 0], green=raw[..., 1], blue=raw[..., 2])
    for k in ("gray", "green"):
        if k in cols:
            cols[k + "+clahe"] = clahe(np.ascontiguousarray(cols[k]))
    return cols


def _near(col: np.ndarray, m: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded samples of ``col`` inside the foreground and in the 3-pixel band around it (what the network must
    tell apart at a boundary: global statistics would measure illumination and the dark outside of a field of view)."""
    band = ndimage.binary_dilation(m, iterations=3) & ~m
    f, b = np.flatnonzero(m.reshape(-1)), np.flatnonzero(band.reshape(-1))
    f = rng.choice(f, min(len(f), n), replace=False) if len(f) else f
    b = rng.choice(b, min(len(b), n), replace=False) if len(b) else b
    flat = col.reshape(-1).astype(np.float32)
    return flat[f], flat[b]


def _fisher(fg: np.ndarray, bg: np.ndarray) -> float:
    """|mean_fg - mean_bg| / sqrt((var_fg + var_bg) / 2): how well one channel separates the classes."""
    if not len(fg) or not len(bg):
        return 0.0
    return float(abs(fg.mean() - bg.mean()) / math.sqrt(max((fg.var() + bg.var()) / 2, 1e-12)))


def network_for(patch: Sequence[int], spacing: Sequence[float]) -> tuple[list[list[int]], list[int]]:
    """nnU-Net's pooling rule: (the strides of each pooling step, 1 or 2 per axis; the total stride per axis). An axis is pooled while its feature map is >= 2 x ``MIN_FEATURE`` and its current spacing is at most twice
    the finest current spacing; at most ``MAX_POOLS`` steps."""
    size, sp = [float(p) for p in patch], [float(s) for s in spacing]
    strides: list[list[int]] = []
    while len(strides) < MAX_POOLS:
        finest = min(s for s, n in zip(sp, size))
        step = [2 if n >= 2 * MIN_FEATURE and s <= 2 * finest else 1 for n, s in zip(size, sp)]
        if not any(x == 2 for x in step):
            break
        strides.append(step)
        size = [n / x for n, x in zip(size, step)]
        sp = [s * x for s, x in zip(sp, step)]
    total = [int(np.prod([s[i] for s in strides])) if strides else 1 for i in range(len(patch))]
    return strides, total


def fitted_patch(patch: Sequence[int], spacing: Sequence[float]) -> tuple[list[int], list[list[int]]]:
    """``patch`` rounded down to a multiple of each axis' total stride (the depth recomputed until stable)."""
    p = [int(x) for x in patch]
    for _ in range(4):
        strides, total = network_for(p, spacing)
        q = [max(t, (x // t) * t) for x, t in zip(p, total)]
        if q == p:
            return p, strides
        p = q
    return p, network_for(p, spacing)[0]


class SegPlan(BaseModel):
    """What ``medlens plan`` decided for segmentation data, and from what (the config's ``plan:``)."""

    model_config = ConfigDict(extra="forbid")
    planner: str = "segmentation"
    planner_version: int = SEG_PLANNER_VERSION
    budget: str
    budget_seconds: float
    seed: int
    input: str
    machine: dict[str, Any] = {}
    fingerprint: SegFingerprint
    speeds: list[dict]
    estimates: dict[str, float]
    decisions: list[Decision]


class SegPlanner:
    """The rules. From the fingerprint (``plan_from_fingerprint``): ``determine_target_spacing``,
    ``determine_normalization``, ``determine_color``, ``determine_clahe``, ``determine_loss``, ``determine_foreground_oversampling``,
    ``determine_augmentation``, ``determine_optimizer``. From the measured speeds: ``determine_precision``,
    ``determine_patch_size`` (with ``determine_network``), ``determine_batch_size``, ``determine_epochs``,
    ``determine_inference``. ``planned_at``: the planning seconds (this machine's stored figures) so far."""

    def __init__(self, fp: SegFingerprint, budget_s: float | None = None, *, seed: int = 0,
                 color_given: str | None = None, clahe_given: bool | None = None) -> None:
        self.fp, self.budget_s, self.seed, self.color_given = fp, budget_s, seed, color_given
        self.clahe_given = clahe_given
        self.decisions: list[Decision] = []
        self.data: dict[str, Any] = {}
        self.seg: dict[str, Any] = {}
        self.train: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.target_spacing: list[float] = list(fp.median_spacing)
        self.patch: list[int] = []
        self.strides: list[list[int]] = []
        self.batch = MIN_BATCH[fp.spatial_dims]
        self.epochs = 0
        self.planned_at = 0.0
        self.load_s = 0.0

    def decide(self, setting: str, value: Any, reason: str) -> Any:
        self.decisions.append(Decision(setting=setting, value=value, reason=reason))
        return value

    # ------------------------------------------------------------ from the fingerprint
    def plan_from_fingerprint(self) -> None:
        self.determine_target_spacing()
        self.determine_normalization()
        self.determine_color()
        self.determine_clahe()
        self.determine_loss()
        self.determine_foreground_oversampling()
        self.determine_augmentation()
        self.determine_optimizer()
        self.determine_inference()

    @property
    def median_shape_at_target(self) -> list[int]:
        fp = self.fp
        return [max(1, int(round(n * s / t))) for n, s, t in zip(fp.median_shape, fp.median_spacing,
                                                                  self.target_spacing)]

    def determine_target_spacing(self) -> list[float]:
        fp = self.fp
        med, p10 = list(fp.median_spacing), list(fp.spacing_p10)
        finest = min(med)
        target = list(med)
        aniso = [i for i, s in enumerate(med) if s > ANISOTROPY * finest]
        why = f"median spacing per axis {med}"
        if aniso:
            for i in aniso:
                target[i] = p10[i]
            why += (f"; axis {', '.join(map(str, aniso))} is anisotropic (median spacing > {ANISOTROPY:g}x the "
                    f"finest {finest:g}): its 10th percentile {[p10[i] for i in aniso]} instead, so the cases with "
                    "thin slices are not thrown away")
        self.target_spacing = target
        sp = np.array(fp.spacings, np.float64)
        dev = float(np.max(np.abs(sp / np.array(target) - 1))) if len(sp) else 0.0
        why += (f"; the median shape at the target spacing is {self.median_shape_at_target}. medlens trains on the "
                "native grid (no resampling step): patch and depth are computed at this spacing; the training cases' "
                f"spacings are within {100 * dev:.0f}% of it" + (" (every case on it)" if dev < 0.01 else ""))
        return self.decide("plan.target_spacing", target, why)

    def determine_normalization(self) -> dict:
        fp, it = self.fp, self.fp.intensity
        if fp.modality == "CT":
            lo, hi = it.p005, it.p995
            window = f"{(lo + hi) / 2:.1f},{max(hi - lo, 1e-3):.1f}"
            self.data.update(window=window, intensity="unit", normalize="dataset")
            return self.decide("data.intensity", {"window": window, "intensity": "unit", "normalize": "dataset"},
                               f"CT: clipped to the foreground's 0.5-99.5 percentiles ({lo:.0f}..{hi:.0f} HU) "
                               "(data.window), then z-scored over the training set (data.normalize: dataset), "
                               "nnU-Net's CT normalisation: HU are comparable between scans")
        self.data.update(window=None, intensity="zscore", normalize="dataset")
        return self.decide("data.intensity", {"intensity": "zscore"},
                           f"modality {fp.modality} (not CT): intensities carry no absolute unit between images, so "
                           "each image is z-scored on its own (nnU-Net's rule for non-CT data)")

    def _best_input(self) -> str:
        """The measured input that best separates the foreground from the band around it: one of the channels
        ``data.color`` selects (gray, green), with or without CLAHE, or a channel only the three together carry."""
        sep = self.fp.channel_separation
        return max(sorted(sep), key=lambda k: sep[k])

    def determine_color(self) -> str | None:
        """Colour photographs: the single channel (gray or green, with CLAHE or not) that best separates the
        foreground from the band around it; all three when a channel ``data.color`` cannot select is best."""
        fp = self.fp
        if fp.channels < 3:
            return None
        sep = fp.channel_separation
        if self.color_given:
            self.data["color"] = self.color_given
            return self.decide("data.color", self.color_given,
                               f"given in the data section; measured separation per input {sep}")
        best = self._best_input()
        ch = best.split("+")[0]
        color = ch if ch in ("gray", "green") else "rgb"
        self.data["color"] = color
        return self.decide("data.color", color,
                           f"colour photographs; separation of the foreground from the 3-px band around it (Fisher's "
                           f"criterion) per input {sep}: {best} separates best" +
                           (": one channel in" if color != "rgb" else ", which only the three channels carry"))

    def determine_clahe(self) -> bool:
        """2D 8-bit pictures: CLAHE when the chosen channel separates the foreground better with it (measured)."""
        fp, sep = self.fp, self.fp.channel_separation
        ch = self.data.get("color") or "gray"
        if self.clahe_given is not None:
            self.data["clahe"] = self.clahe_given
            return self.decide("data.clahe", self.clahe_given, "given in the data section")
        if f"{ch}+clahe" not in sep:
            self.data["clahe"] = False
            return self.decide("data.clahe", False, "not an 8-bit 2D picture" if fp.spatial_dims == 2 else
                               "volumes: no CLAHE")
        on = sep[f"{ch}+clahe"] > sep.get(ch, 0.0)
        self.data["clahe"] = on
        return self.decide("data.clahe", on,
                           f"separation of the foreground from the band around it: {sep.get(ch, 0.0):.3f} on {ch}, "
                           f"{sep[f'{ch}+clahe']:.3f} after CLAHE -> " + ("CLAHE" if on else "no CLAHE"))

    def determine_loss(self) -> str:
        share = self.fp.foreground_share
        loss = "dice_focal" if share < 0.001 else "dice_ce"
        self.seg["loss"] = loss
        return self.decide("segmentation.loss", loss,
                           f"foreground {100 * share:.3f}% of the training voxels: " +
                           ("Dice + focal: cross-entropy on so rare a foreground is dominated by background voxels"
                            if loss == "dice_focal" else
                            "Dice + cross-entropy (nnU-Net's default): Dice for the overlap, CE for calibrated "
                            "voxel probabilities"))

    def determine_foreground_oversampling(self) -> float:
        share = self.fp.foreground_share
        ratio = 0.5 if share < 0.01 else 0.33
        self.seg["foreground_ratio"] = ratio
        return self.decide("segmentation.foreground_ratio", ratio,
                           f"foreground {100 * share:.2f}% of the voxels: " +
                           ("under 1%, half the patches centred on foreground so most batches hold some"
                            if ratio == 0.5 else "a third of the patches centred on foreground (nnU-Net's "
                                                 "oversampling); random patches already hold foreground often"))

    def determine_augmentation(self) -> dict:
        fp = self.fp
        aniso = any(t > ANISOTROPY * min(self.target_spacing) for t in self.target_spacing)
        aug: dict[str, Any] = {"hflip": 0.5, "vflip": 0.5, "brightness": 0.1, "contrast": 0.2}
        why = "mirroring on the in-plane axes and brightness/contrast jitter (nnU-Net's defaults)"
        if fp.spatial_dims == 2:
            aug["rot90"] = True
            why += "; 2D: quarter turns (isotropic pixels)"
        elif not aniso:
            aug["dflip"] = 0.5
            why += "; isotropic volume: mirroring along the slice axis too"
        else:
            why += "; anisotropic volume: no mirroring or turns across the thick-slice axis"
        self.train["augment"] = aug
        return self.decide("train.augment", aug, why)

    def determine_optimizer(self) -> str:
        self.train.update(optimizer="adamw", lr=0.003, weight_decay=1e-4, scheduler="cosine", monitor="val_dice")
        return self.decide("train.optimizer", "adamw, lr 0.003, wd 1e-4, cosine",
                           "AdamW with a cosine schedule converges within a few thousand steps; nnU-Net's SGD "
                           "(momentum 0.99, poly) is tuned for its 250,000")

    # ------------------------------------------------------------ from the measured speeds
    def determine_precision(self, speeds: dict[str, ProbeResult]) -> str:
        prec = max(("bf16-mixed", "32"), key=lambda p: speeds[p].train_img_per_s)
        other = "32" if prec != "32" else "bf16-mixed"
        self.train["precision"] = prec
        return self.decide("train.precision", prec,
                           f"measured {speeds[prec].train_img_per_s:.1f} patches/s with {prec} against "
                           f"{speeds[other].train_img_per_s:.1f} with {other} (training steps on real patches)")

    def initial_patch(self) -> list[int]:
        """nnU-Net's start: the median shape at the target spacing, capped at 256 px (2D) / 128 voxels (3D)."""
        cap = 256 if self.fp.spatial_dims == 2 else 128
        return fitted_patch([min(cap, n) for n in self.median_shape_at_target], self.target_spacing)[0]

    def fit_seconds(self, post_s: float) -> float:
        """What the budget leaves for fitting: minus planning, loading (x1.2), evaluation, start-up and a margin
        (5%, at least 10 s); the planned fit uses ``SAFETY`` of it."""
        b = float(self.budget_s or 0)
        return b - self.planned_at - 1.2 * self.load_s - post_s - STARTUP_S - max(10.0, 0.05 * b)

    def determine_patch_size(self, voxels_per_s: float, post_s: float) -> list[int]:
        """The largest patch (from the median shape down, the largest axis in mm shrunk first) whose fit gets
        ``TARGET_STEPS`` steps of ``MIN_BATCH`` patches at ``voxels_per_s`` (measured training voxels/s)."""
        dims = self.fp.spatial_dims
        fit = SAFETY * self.fit_seconds(post_s)
        budget_vox = fit * voxels_per_s
        need = lambda p: float(np.prod(p)) * MIN_BATCH[dims] * TARGET_STEPS  # noqa: E731
        patch = self.initial_patch()
        start = list(patch)
        while need(patch) > budget_vox:
            mm = [p * s for p, s in zip(patch, self.target_spacing)]
            _, total = network_for(patch, self.target_spacing)
            order = sorted(range(dims), key=lambda i: -mm[i])
            i = next((i for i in order if patch[i] - total[i] >= MIN_PATCH[dims]), None)
            if i is None:
                break
            patch[i] -= total[i]
            patch, _ = fitted_patch(patch, self.target_spacing)
        self.patch, self.strides = fitted_patch(patch, self.target_spacing)
        self.seg["patch_size"] = self.patch
        return self.decide("segmentation.patch_size", self.patch,
                           f"from the median shape {self.median_shape_at_target} (capped at {start}), the largest "
                           f"axis in mm shrunk until {TARGET_STEPS} steps of {MIN_BATCH[dims]} patches fit the "
                           f"fitting time ({format_seconds(fit)} at {voxels_per_s / 1e6:.2f} M voxels/s measured): "
                           f"{int(np.prod(self.patch)) * MIN_BATCH[dims] * TARGET_STEPS / 1e9:.2f} of "
                           f"{budget_vox / 1e9:.2f} G voxels")

    def unet_params(self, patch: Sequence[int]) -> dict[str, Any]:
        """The U-Net of a patch: one level per pooling step of ``network_for``, widths ``BASE_WIDTH`` doubling up
        to ``MAX_WIDTH``; per-axis strides where an axis stops being pooled before another."""
        dims = self.fp.spatial_dims
        steps, _ = network_for(patch, self.target_spacing)
        widths = [min(MAX_WIDTH[dims], BASE_WIDTH * 2 ** i) for i in range(len(steps) + 1)]
        uniform = all(len(set(s)) == 1 for s in steps)
        strides: list[Any] = [s[0] for s in steps] if uniform else steps
        return {"channels": widths, "strides": strides, "num_res_units": 0, "norm": "instance"}

    def determine_network(self) -> dict:
        dims = self.fp.spatial_dims
        params = self.unet_params(self.patch)
        bottom = [p // t for p, t in zip(self.patch, network_for(self.patch, self.target_spacing)[1])]
        self.model = {"name": "unet", "params": params}
        per_axis = [sum(1 for s in self.strides if s[i] == 2) for i in range(dims)]
        return self.decide("model", self.model,
                           f"U-Net pooled {per_axis} times per axis: an axis is pooled while its feature map is >= "
                           f"{2 * MIN_FEATURE} px and its spacing at most twice the finest, so the bottleneck is "
                           f"{bottom} px; {len(params['channels'])} levels, widths {BASE_WIDTH} doubling up to "
                           f"{MAX_WIDTH[dims]}; instance norm (nnU-Net: batch statistics of a few patches are noisy)")

    def determine_batch_size(self, voxels_per_s: float, post_s: float) -> int:
        dims = self.fp.spatial_dims
        vox = float(np.prod(self.patch))
        fit = SAFETY * self.fit_seconds(post_s)
        buys = int(fit * voxels_per_s / (vox * TARGET_STEPS))
        train_vox = float(sum(np.prod(s) for s in self.fp.shapes))
        share_cap = max(1, int(BATCH_SHARE * train_vox / vox))
        bs = int(max(MIN_BATCH[dims], min(buys, share_cap, MAX_BATCH[dims])))
        self.batch = bs
        self.train["batch_size"] = bs
        return self.decide("train.batch_size", bs,
                           f"the budget buys {buys} patches per step at {TARGET_STEPS} steps; 5% of the training "
                           f"voxels is {share_cap} patches; within {MIN_BATCH[dims]}..{MAX_BATCH[dims]} ({dims}D)")

    def epoch_seconds(self, r: ProbeResult, val_every: int = 1) -> float:
        """One epoch: ``STEPS_PER_EPOCH`` steps at the measured rate plus its share of a whole-image validation."""
        train = STEPS_PER_EPOCH * self.batch / r.train_img_per_s
        val = self.fp.n["val"] / r.val_img_per_s
        return train + EPOCH_FIXED_S + val / val_every

    def post_seconds(self, r: ProbeResult) -> float:
        """After fitting: the threshold on validation and the test evaluation (each case predicted once, measured
        speed), surface metrics per case and the fixed work (bootstrap, plots, report)."""
        n = self.fp.n
        cases = n["val"] + n["test"]
        return POST_FIXED_S + cases / r.val_img_per_s + POST_PER_CASE_S * cases

    def determine_epochs(self, r: ProbeResult, budget_text: str) -> int:
        post = self.post_seconds(r)
        fit = SAFETY * self.fit_seconds(post)
        step_s = self.batch / r.train_img_per_s
        val_s = self.fp.n["val"] / r.val_img_per_s
        epochs = int(fit / self.epoch_seconds(r, 1))
        val_every = 1
        for _ in range(3):
            val_every = max(1, math.ceil(epochs * val_s / max(VAL_SHARE * fit, 1e-9)))
            epochs = int(fit / self.epoch_seconds(r, val_every))
        if epochs < 2:
            need = self.planned_at + 1.2 * self.load_s + post + STARTUP_S + 2 * self.epoch_seconds(r) / SAFETY
            raise ConfigError(f"budget {budget_text} is too small: two epochs of the smallest plan take "
                              f"{2 * self.epoch_seconds(r):.0f}s (planning {self.planned_at:.0f}s, loading "
                              f"{self.load_s:.0f}s, evaluation {post:.0f}s); give at least "
                              f"{format_seconds(need * 1.1)}")
        self.epochs = epochs
        self.train["epochs"] = epochs
        self.seg["patches_per_epoch"] = STEPS_PER_EPOCH * self.batch
        self.seg["val_every"] = val_every
        return self.decide("train.epochs", epochs,
                           f"{epochs} epochs x {STEPS_PER_EPOCH} steps of {self.batch} patches "
                           f"(segmentation.patches_per_epoch {STEPS_PER_EPOCH * self.batch}) = "
                           f"{epochs * STEPS_PER_EPOCH} steps: measured {step_s:.2f} s per step and "
                           f"{val_s:.1f} s per whole-image validation of {self.fp.n['val']} cases, validated every "
                           f"{val_every} epochs (<= {100 * VAL_SHARE:.0f}% of the fit); "
                           f"{format_seconds(fit)} of fitting planned ({100 * SAFETY:.0f}% of what the budget "
                           "leaves)")

    def determine_inference(self) -> dict:
        dims = self.fp.spatial_dims
        inf = {"overlap": 0.5, "sw_batch_size": 16 if dims == 2 else 4, "blend": "gaussian", "threshold": "val"}
        self.seg.update(inf)
        return self.decide("segmentation.inference", inf,
                           "sliding windows of the patch size overlapping by half with Gaussian blending "
                           "(nnU-Net); the binary threshold chosen on the validation cases' mean Dice")

    def estimates(self, r: ProbeResult) -> dict[str, float]:
        post = self.post_seconds(r)
        ep = self.epoch_seconds(r, int(self.seg.get("val_every", 1)))
        fit = self.epochs * ep
        margin = max(10.0, 0.05 * float(self.budget_s or 0))
        return {"planning_s": round(self.planned_at, 1), "load_s": round(self.load_s, 1), "epoch_s": round(ep, 2),
                "member_fit_s": round(fit, 1), "fit_s": round(fit, 1), "post_s": round(post, 1),
                "margin_s": round(margin, 1),
                "total_s": round(self.planned_at + 1.2 * self.load_s + fit + post + STARTUP_S, 1)}


# ---------------------------------------------------------------- the speed probe
class StepTimes(Callback):
    """The end time of each training step; stops the fit after ``max_seconds`` of steps (at least four run, the
    last two timed)."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.ends: list[float] = []
        self.stopped = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        if self.ends[-1] - self.ends[0] > self.max_seconds and len(self.ends) >= 5:
            trainer.should_stop = True
            self.stopped = True


def probe_segmentation(train_cfg, seg_cfg, split: SegSplit, model: str, params: dict, n_outputs: int, *,
                       batches: int = 6, max_seconds: float = 6.0, seed: int = 0) -> ProbeResult:
    """Time ``batches`` patch training steps (sampled as training samples them, augmentation and loss included; the first two, allocation and
    kernel selection, not timed) of
    ``model`` with ``train_cfg`` and ``seg_cfg``, then one whole-image sliding-window inference of the validation
    case nearest the median size. ``train_img_per_s``: patches/s (median step); ``val_img_per_s``: validation cases
    per second, scaled to the median case size; stops after ``max_seconds`` of steps (at least four)."""
    t_start = time.perf_counter()
    tr = split.train
    first = tr[0]
    bs = int(train_cfg.batch_size)
    torch.manual_seed(seed)
    c = first.channels
    net = build_network(model, c, n_outputs, first.dims, list(seg_cfg.patch_size), params, [0.0] * c, [1.0] * c)
    sampler = PatchSampler(tr, seg_cfg.patch_size, bs * (batches + 1), seg_cfg.foreground_ratio, seed)
    cfg = train_cfg.model_copy(update={"ema": None, "max_minutes": None, "progressive": None, "epochs": 1})
    module = SegmentationModule(net, cfg, seg_cfg, n_outputs, seed=seed, sampler=sampler)
    timer = StepTimes(max_seconds)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision=train_cfg.precision,
                        callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = DataLoader(sampler_dataset(sampler), batch_size=bs, shuffle=False)
    with warnings.catch_warnings():   # no validation loader: the probe times training steps only
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        trainer.fit(module, loader, weights_only=True)
    steps = np.diff(timer.ends)
    timed = steps[2:] if len(steps) > 2 else steps   # the first two (allocation, kernel selection) are not timed
    train_speed = float(bs / max(float(np.median(timed)), 1e-9))
    val_speed = _inference_speed(module.model.eval(), split.val or tr, seg_cfg, train_cfg.precision)
    return ProbeResult(model=model, params=dict(params), size=list(seg_cfg.patch_size),
                       precision=train_cfg.precision, batch_size=bs, train_steps=int(len(timed)),
                       train_img_per_s=train_speed, val_img_per_s=val_speed,
                       seconds=time.perf_counter() - t_start, stopped_early=timer.stopped)


def sampler_dataset(sampler: PatchSampler) -> Dataset:
    """``PatchSampler`` is a map-style dataset (len, getitem) without torch's base class."""
    return sampler  # type: ignore[return-value]


def _inference_speed(net, cases: list[SegCase], seg_cfg, precision: str) -> float:
    """Whole-image cases per second: the case nearest the median size predicted once by sliding windows, the time
    scaled to the median size."""
    sizes = [float(np.prod(c.grid)) for c in cases]
    med = float(np.median(sizes))
    i = int(np.argmin([abs(s - med) for s in sizes]))
    x = torch.from_numpy(np.ascontiguousarray(cases[i].image))
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        predict_probs(net, x, list(seg_cfg.patch_size), seg_cfg.overlap, seg_cfg.blend, seg_cfg.sw_batch_size)
    dt = (time.perf_counter() - t) * med / max(sizes[i], 1.0)
    return 1.0 / max(dt, 1e-6)
