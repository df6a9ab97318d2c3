"""The planning rules of ``medlens plan`` / ``train --auto`` (issue 17), as one ``Planner`` with a
``determine_*`` method per decision (nnU-Net's ``ExperimentPlanner`` shape).

The rules read only the dataset's fingerprint (``data.fingerprint``) and the speeds measured on this machine
(``engine.probe``): no dataset is known by name. Each ``determine_*`` method records one ``Decision`` (the
setting, its value and why) and returns the value. ``workflow.plan.make_plan`` orchestrates: it loads the data,
runs the probes and calls the methods in order; a subclass that overrides one method changes that decision only.

The cost model (what a run costs besides fitting) and the budget's shares are below; the budget covers the
whole of ``medlens train --auto``: planning, loading, fitting (all ensemble members), evaluation, explanations
and the report, with a safety margin.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from medlens.config import ExplainConfig
from medlens.data.fingerprint import Fingerprint
from medlens.errors import ConfigError
from medlens.tasks import get_task

if TYPE_CHECKING:  # the probe (Lightning) runs in workflow.plan; the rules only read its results
    from medlens.engine.probe import ProbeResult, SignalResult

PLANNER_VERSION = 1
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}

# Measured on the 2-core reference machine (benchmarks/auto.py, docs/auto.md): what a run costs besides fitting.
# Calibration, threshold, bootstrap CIs, plots and the report, predictions and the explanation section (below)
# aside: 7.5 s for a binary and 12 s for a 5-class 5-fold run on the quiet machine (2026-12-03, 15m `train --auto`,
# docs/auto.md): 5 s + 1 s per class
POST_FIXED_S = 5.0
POST_PER_CLASS_S = 1.0
# The report's explanation section (explain.run.write_report_section): on select_images validation images each of
# the EXPLAIN_CANDIDATES methods (explain.run.REPORT_CANDIDATES) is scored by deletion and insertion against a
# random map, then the chosen one on score_images test images: ~85 forward passes per image and method plus the
# method's own (integrated gradients: 32 steps, forward and backward), on small batches. Measured on the quiet
# 2-core machine (2026-12-03, benchmarks/auto.py): 238 s for a 5-member 3D ensemble at 358 img/s, 13 s for 2D
# 5-member ensembles at 4035 and 7418 img/s, i.e. 237, 146 and 278 images' worth of batched inference per image
# explained: EXPLAIN_FORWARDS. Where the section at the default image counts would take more than EXPLAIN_SHARE
# of the budget (a 3D ensemble: 13% of 30 minutes) the plan explains fewer images (determine_explanations).
EXPLAIN_FORWARDS = 240.0
EXPLAIN_CANDIDATES = 5
EXPLAIN_SHARE = 0.05
EXPLAIN_MIN = (2, 8)     # the fewest (selection, scoring) images the section is given
# per epoch besides the images where no whole epoch was measured (checkpoints, history row, validation metrics; the
# segmentation planner's estimate uses it too). A measured calibration (engine.probe.calibrate) already holds it: on
# the quiet machine (2026-12-03, benchmarks/auto.py) the binary and the 5-class 15m plans' fold models took 699 and
# 708 s against 699 and 718 s planned from it
EPOCH_FIXED_S = 0.4
# a fit's cost besides its epochs where it was not measured (a calibration cut on a busy machine): Lightning's set-up,
# the first epoch's warm-up, the best weights loaded; the calibration measures it (engine.probe.calibrate)
FIT_FIXED_S = 3.0
STARTUP_S = 10.0         # importing torch, Lightning and MONAI before the budget's clock can start
# issue 30 item 3, the whole budget: a plan uses >= 90% of its budget and never overruns it by more than 5%. The
# planned total (start-up included) is at most (1 - RESERVE) of the budget, the planned fitting SAFETY of its share
# (absorbing noise in the measured epoch), and train.max_minutes cuts fitting only where the run would overrun the
# budget by OVERRUN (a machine ~10% slower than its stored figures still finishes uncut; docs/auto.md)
RESERVE = 0.02
OVERRUN = 0.05           # the most a run may overrun its budget: train.max_minutes cuts fitting there
SAFETY = 0.98            # planned fitting uses at most this share of its time; the rest absorbs noise
TARGET_STEPS = 1200      # optimiser steps one member should get before the budget buys more members
MAX_MEMBERS = 5
# issue 30: cross-validation inside the plan. Below CV_MAX_POOLED train+val cases the validation split is too small
# to choose epochs and a threshold on (the binomial standard error of an accuracy at n = 500 is ~0.02, the size of
# the differences being chosen between): train and val are pooled and dealt into k folds, the k fold models are the
# ensemble, and every choice is made on the pooled out-of-fold predictions. From CV_MAX_POOLED up the holdout
# validation split is kept (>= ~1000 validation cases at MedMNIST's 1:8 ratio; k fold models would cost k members).
CV_MAX_POOLED = 10000
CV_FOLDS = (5, 4, 3)     # nnU-Net's five folds first; fewer only when five do not fit the budget
# issue 30 item 3: what the budget leaves once every member has its target epochs buys more epochs for all of them,
# up to this many times the target (members keep their best held-out epoch, so long training costs no accuracy)
MAX_EPOCH_FACTOR = 10
# issue 30 item 2: architecture by measurement (2D). Each candidate gets a speed probe; those that could train at
# least half their target epochs within the budget get a short cross-validated signal run: an equal share of
# SIGNAL_SHARE of the budget (at most SIGNAL_MAX_S each) as seeded optimiser steps at their measured speed, on
# folds 1..4 of five of train+val, scored by AUC on fold 0 (at most SIGNAL_MAX_HELD cases). The highest signal
# wins; AUCs within SIGNAL_TIE of the best count as equal, and of those the one with most epochs in the budget wins.
# Below SIGNAL_MIN_BUDGET_S (or for volumes) the fingerprint's rule decides, and the reason says so.
SIGNAL_MIN_BUDGET_S = 300.0
SIGNAL_SHARE = 0.10
SIGNAL_MAX_S = 60.0
SIGNAL_MIN_STEPS = 20
SIGNAL_FOLDS = 5
SIGNAL_MAX_HELD = 512
SIGNAL_TIE = 0.01


class Decision(BaseModel):
    """One planned setting, with why."""

    model_config = ConfigDict(extra="forbid")
    setting: str
    value: Any
    reason: str


class Plan(BaseModel):
    """What ``medlens plan`` decided, and from what (dumped into the config's ``plan:``)."""

    model_config = ConfigDict(extra="forbid")
    planner_version: int = PLANNER_VERSION
    budget: str
    budget_seconds: float
    seed: int
    input: str
    machine: dict[str, Any] = {}   # what the figures were measured on: CPU model, cores, torch version
    fingerprint: Fingerprint
    speeds: list[dict]
    signals: list[dict] = []      # the candidate architectures' cross-validated signal runs (issue 30 item 2)
    estimates: dict[str, float]
    decisions: list[Decision]


def parse_budget(text: str) -> float:
    """``"15m"``, ``"30s"``, ``"1h"``, ``"1h30m"``, ``"90"`` (seconds) -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        total = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|sec|s)", s)
        if not parts or "".join(a + b for a, b in parts) != s:
            raise ConfigError(f"budget '{str(text)[:40]}' is not a duration such as 15m, 90s, 1h or 1h30m")
        total = sum(float(a) * _UNITS[b] for a, b in parts)
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"budget '{str(text)[:40]}' must be a positive duration such as 15m")
    return total


def format_seconds(s: float) -> str:
    s = int(math.ceil(s))
    if s < 120:
        return f"{s}s"
    return f"{math.ceil(s / 60)}m"


def pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1))))


def target_epochs(n_train: int, batch: int) -> int:
    """Epochs giving one member about ``TARGET_STEPS`` optimiser steps (15..100)."""
    return int(min(100, max(15, math.ceil(TARGET_STEPS * batch / max(n_train, 1)))))


def ema_decay(steps: int) -> float | None:
    if steps < 200:
        return None
    return round(min(0.9995, max(0.99, 1 - 1 / (0.25 * steps))), 4)


class Planner:
    """The rules, one ``determine_*`` method per decision, in the order ``make_plan`` calls them.

    From the fingerprint alone (``plan_from_fingerprint`` calls them): ``determine_model``,
    ``determine_batch_size``, ``determine_optimizer``, ``determine_weight_decay``, ``determine_augmentation``,
    ``determine_imbalance``, ``determine_label_smoothing``, ``determine_monitor``. From the budget and the
    measured speeds: ``determine_precision``, ``determine_resolution``, ``determine_validation`` (k-fold
    cross-validation on train+val or the holdout validation split), ``determine_epochs``,
    ``determine_ensemble``, ``determine_max_minutes``, ``determine_ema``, ``determine_mixup``,
    ``determine_cutmix``, ``determine_progressive``, ``determine_tta``, ``determine_threshold``.

    ``budget_s`` and ``started`` (when the budget's clock started, on ``clock``) are needed by the budget's
    rules only; ``planned_at`` is the planning time spent so far, measured by ``determine_resolution``."""

    def __init__(self, fp: Fingerprint, budget_s: float | None = None, *, seed: int = 0,
                 started: float | None = None, clock: Callable[[], float] = time.monotonic,
                 explain: ExplainConfig | None = None) -> None:
        self.fp, self.budget_s, self.seed, self.clock = fp, budget_s, seed, clock
        self.explain = explain or ExplainConfig()   # the report's explanation settings the plan starts from
        self.started = clock() if started is None else started
        self.decisions: list[Decision] = []
        self.model: str = ""
        self.params: dict[str, Any] = {}
        self.train: dict[str, Any] = {}
        self.planned_at = 0.0
        self.members = 1
        self.folds = 0      # k >= 2: cross-validation on train+val pooled (determine_validation); 0: holdout
        self.epochs = 0
        self.steps = 0
        self.image_size = fp.image_shape[0]

    def decide(self, setting: str, value: Any, reason: str) -> Any:
        self.decisions.append(Decision(setting=setting, value=value, reason=reason))
        return value

    def redecide(self, setting: str, value: Any, reason: str) -> Any:
        """Replace the decision of ``setting`` in place (a measurement revising a rule's choice)."""
        for i, d in enumerate(self.decisions):
            if d.setting == setting:
                self.decisions[i] = Decision(setting=setting, value=value, reason=reason)
                return value
        return self.decide(setting, value, reason)

    # ------------------------------------------------------------ from the fingerprint
    def plan_from_fingerprint(self) -> tuple[dict, list[Decision]]:
        """Settings that follow from the fingerprint alone (the budget decides the rest)."""
        self.determine_model()
        self.determine_batch_size()
        self.determine_optimizer()
        self.determine_weight_decay()
        self.determine_augmentation()
        self.determine_imbalance()
        self.determine_label_smoothing()
        self.determine_monitor()
        return {"model": self.model, "params": self.params, "train": self.train}, self.decisions

    def determine_model(self) -> dict:
        fp = self.fp
        n = fp.n["train"]
        if fp.spatial_dims == 3:
            model, params = "fast_cnn3d", {"widths": [16, 32, 64, 128], "dropout": 0.3}
            why = ("3D volumes: a 4-stage 3D CNN sized for CPU (global pooling, so it takes any input size and "
                   "progressive resizing)")
        else:
            model, params = "small_cnn", {"widths": [32, 64, 128], "dropout": 0.3 if n < 2000 else 0.2}
            why = (f"2D images, {n} training samples: a 3-stage CNN (32/64/128) learns {fp.image_shape[0]} px "
                   "inputs fast on a CPU; deeper ImageNet-style networks need far more steps than the budget buys")
            if n >= 20000:
                params["widths"] = [48, 96, 192]
                why = f"2D images, {n} training samples: enough data for a wider 3-stage CNN (48/96/192)"
        self.model, self.params = model, params
        return self.decide("model", {"name": model, "params": params},
                           why + f"; dropout {params['dropout']} ({'under' if n < 2000 else 'over'} 2000 "
                                 "training samples)")

    # ------------------------------------------------------------ architecture by measurement (issue 30 item 2)
    def model_candidates(self) -> list[tuple[str, str, dict]]:
        """``(label, model, params)`` of the architectures measured against each other: the rule's small CNN, the
        same at twice its widths, ResNet-18 with the MedMNIST stem (3x3 stride-1, no max-pool at <= 64 px) and a
        small ViT (4 blocks of 96, 4 px patches, when the side divides by 4). 2D only: none for volumes."""
        fp = self.fp
        if fp.spatial_dims != 2:
            return []
        w = list(self.params.get("widths", [32, 64, 128])) if self.model == "small_cnn" else [32, 64, 128]
        drop = self.params.get("dropout", 0.3)
        cands = [(f"small_cnn {'/'.join(map(str, w))}", "small_cnn", {"widths": w, "dropout": drop}),
                 (f"small_cnn {'/'.join(str(2 * x) for x in w)}", "small_cnn",
                  {"widths": [2 * x for x in w], "dropout": drop}),
                 ("resnet18", "resnet18", {})]
        if all(s % 4 == 0 for s in fp.image_shape):
            cands.append(("vit", "vit", {"patch_size": 4}))
        return cands

    def candidate_epochs(self, r: ProbeResult, load: float) -> int:
        """Epochs one member of a candidate measured by ``r`` could train within the budget (all the fitting
        share, at its probed speed; the same holdout epoch for every candidate)."""
        fit = SAFETY * (self.available(load) - self.post_seconds(r, 1, 0)) - self.fixed_seconds(r)
        return int(max(0.0, fit) / self.epoch_seconds(r, 0))

    def signal_steps(self, cands: list[tuple[str, str, dict]], probes: dict[str, ProbeResult],
                     load: float) -> dict[str, int]:
        """Optimiser steps of each candidate's signal run (0: not run): an equal share of ``SIGNAL_SHARE`` of the
        budget (at most ``SIGNAL_MAX_S``) at the candidate's measured speed, for the candidates that could train at
        least half their target epochs within the budget and reach ``SIGNAL_MIN_STEPS``."""
        self.planned_at = self.elapsed()
        half = max(1, math.ceil(self.target_epochs / 2))
        fast = [c for c in cands if self.candidate_epochs(probes[c[0]], load) >= half]
        each = min(SIGNAL_MAX_S, SIGNAL_SHARE * self._budget() / max(len(fast), 1))
        steps = {}
        for label, _, _ in cands:
            r = probes[label]
            n = int(each * r.train_img_per_s / r.batch_size) if any(c[0] == label for c in fast) else 0
            steps[label] = n if n >= SIGNAL_MIN_STEPS else 0
        return steps

    def model_fallback(self, why: str) -> None:
        """The rule's model stays; its reason says why it was not chosen by measurement."""
        d = next(d for d in self.decisions if d.setting == "model")
        self.redecide("model", d.value, d.reason + f"; not chosen by measurement: {why}")

    def choose_model(self, cands: list[tuple[str, str, dict]], probes: dict[str, ProbeResult],
                     signals: dict[str, SignalResult], load: float) -> dict:
        """The architecture by measurement: of the candidates with a signal run that could train at least half
        their target epochs within the budget, the highest signal AUC; those within ``SIGNAL_TIE`` of it count as
        equal and the one with most epochs in the budget wins (the first listed on a tie). The reason gives every
        candidate's speed, signal AUC and epochs. Without such a candidate the rule's model stays."""
        self.planned_at = self.elapsed()
        half = max(1, math.ceil(self.target_epochs / 2))
        rows, ok = [], []
        for label, model, params in cands:
            r, sig = probes[label], signals.get(label)
            e = self.candidate_epochs(r, load)
            rows.append(f"{label} {r.train_img_per_s:.0f} img/s, "
                        + (f"signal AUC {sig.auc:.3f} ({sig.steps} steps)" if sig else "no signal run")
                        + f", {e} epochs in the budget")
            if sig is not None and e >= half:
                ok.append((label, model, params, sig.auc, e))
        measured = ("measured (training speed; AUC on a held-out fold of train+val after a seeded run of an equal "
                    "share of the budget; epochs one member could train in the budget): " + "; ".join(rows))
        if not ok:
            self.model_fallback(f"no candidate could train half its target ({half}) epochs with a signal run; "
                                + measured)
            return {"name": self.model, "params": self.params}
        best = max(c[3] for c in ok)
        label, model, params, auc, e = max((c for c in ok if c[3] >= best - SIGNAL_TIE), key=lambda c: c[4])
        n = self.fp.n["train"]
        if model == "small_cnn":
            what = "a 3-stage CNN"
        elif model == "resnet18":
            what = "ResNet-18 with the MedMNIST stem (3x3 stride-1 convolution, no max-pool at <= 64 px)"
        else:
            what = "a small vision transformer (4 blocks of 96, 4 px patches)"
        self.model, self.params = model, dict(params)
        return self.redecide("model", {"name": model, "params": self.params},
                             f"2D images, {n} training samples: {label}, {what}: signal AUC {auc:.3f}"
                             + (f", within {SIGNAL_TIE} of the best {best:.3f}, and the most epochs of those ({e})"
                                if auc < best else f", the best ({e} epochs in the budget)")
                             + f"; {measured}")

    def determine_batch_size(self) -> int:
        n, dims = self.fp.n["train"], self.fp.spatial_dims
        hi = 32 if dims == 3 else 128
        bs = int(min(hi, max(16, pow2_floor(n / 16))))
        self.train["batch_size"] = bs
        return self.decide("train.batch_size", bs,
                           f"n_train/16 rounded down to a power of two, within 16..{hi} ({dims}D): about 16+ "
                           "steps per epoch on small sets, full batches on large ones")

    def determine_optimizer(self) -> str:
        self.train["lr"], self.train["optimizer"], self.train["scheduler"] = 0.002, "adamw", "cosine"
        return self.decide("train.optimizer", "adamw, lr 0.002, cosine",
                           "AdamW with a cosine schedule converges in ~1000 steps at this batch size without "
                           "tuning; the schedule ends exactly at the planned epoch count")

    def determine_weight_decay(self) -> float:
        n = self.fp.n["train"]
        wd = 0.001 if n < 2000 else 0.0005
        self.train["weight_decay"] = wd
        return self.decide("train.weight_decay", wd,
                           f"{n} training samples: {'stronger' if n < 2000 else 'moderate'} regularisation")

    def determine_augmentation(self) -> dict:
        fp = self.fp
        if fp.spatial_dims == 3:
            aug = {"hflip": 0.5, "vflip": 0.5, "rotate": 10, "translate": 0.05, "scale": 0.05}
            why = "volumes: flips in-plane and small rotations/shifts keep anatomy plausible"
        elif fp.field_of_view == "circular":
            aug = {"hflip": 0.5, "vflip": 0.5, "rotate": 20, "translate": 0.05, "scale": 0.1, "brightness": 0.1,
                   "contrast": 0.15}
            why = (f"dark corners (corner/centre intensity {fp.intensity.corner_to_centre:.2f}): a circular field "
                   "of view, content without a canonical orientation -> both flips and larger rotations; colour "
                   "jitter")
        else:
            aug = {"hflip": 0.5, "rotate": 10, "translate": 0.08, "scale": 0.1, "brightness": 0.1, "contrast": 0.1}
            why = ("full field of view with a canonical up direction (radiograph-like): horizontal flips and small "
                   "affine, brightness/contrast jitter")
        if fp.intensity.distinct_values <= 16:
            aug.pop("brightness", None)
            aug.pop("contrast", None)
            why += f"; no intensity jitter ({fp.intensity.distinct_values} distinct values: mask-like inputs)"
        self.train["augment"] = aug
        return self.decide("train.augment", aug, why)

    def determine_imbalance(self) -> str:
        """Binary: the plain (prior-matched) loss at any imbalance, so that the uncalibrated 0.5 cut stays the
        accuracy-maximising one (issue 30 item 5); the balanced operating point is the threshold's job.
        Multi-class: weighted only past 10:1."""
        fp = self.fp
        task = get_task(fp.task)
        argmax = task.exclusive and not task.has_threshold     # multi-class and ordinal decisions are argmax
        if task.has_threshold and task.exclusive:
            self.train["imbalance"] = "none"
            return self.decide("train.imbalance", "none",
                               f"binary, training classes {fp.class_counts['train']} (imbalance "
                               f"{fp.imbalance_ratio:.2f}): plain loss, fitted to the natural class prior, so the "
                               "uncalibrated 0.5 cut is the accuracy-maximising one; a weighted loss, a balanced "
                               "sampler or a logit-adjusted loss all fit the balanced prior and move that cut "
                               "towards the rare class (measured: validation sensitivity 0.955 fell to 0.837 on "
                               "test); the balanced operating point is the Youden threshold's job")
        limit = 10.0
        if task.exclusive and fp.imbalance_ratio > limit:
            self.train["imbalance"] = "weighted_loss"
            return self.decide("train.imbalance", "weighted_loss",
                               f"training classes {fp.class_counts['train']}: imbalance {fp.imbalance_ratio:.2f} "
                               f"> {limit:g} -> loss weighted by inverse class frequency (keeps every sample, "
                               "unlike undersampling): a class this rare would otherwise never win the argmax")
        self.train["imbalance"] = "none"
        why = (f"imbalance {fp.imbalance_ratio:.2f} <= {limit:g}: plain loss" if task.exclusive else
               "multi-label: plain per-label loss")
        if argmax and fp.imbalance_ratio > 1.5:
            why += (" (multi-class decisions are argmax: weighting would trade accuracy on frequent classes for "
                    "recall of rare ones; it is used only past 10:1, where a class would otherwise be ignored)")
        return self.decide("train.imbalance", "none", why)

    def determine_label_smoothing(self) -> float:
        fp = self.fp
        task = get_task(fp.task)
        ls = 0.1 if task.exclusive and not task.has_threshold else 0.0
        self.train["label_smoothing"] = ls
        return self.decide("train.label_smoothing", ls,
                           f"{fp.n_classes} classes ({fp.task}): smoothing 0.1 against over-confident neighbours"
                           if ls else f"{fp.task}: no smoothing (the binary threshold is chosen on calibrated scores)")

    def determine_monitor(self) -> str:
        self.train["monitor"] = "val_auc"
        return self.decide("train.monitor", "val_auc",
                           "the best-AUC epoch on the held-out cases is kept (threshold-free, insensitive to "
                           f"imbalance): each fold's own held-out part under cross-validation, else the "
                           f"validation split of {self.fp.n['val']} images (train.cv_folds says which)")

    # ------------------------------------------------------------ the cost model
    @property
    def flips(self) -> list[str]:
        return [a for a in ("hflip", "vflip") if self.train["augment"].get(a)]

    @property
    def tta_views(self) -> int:
        return 1 + len(self.flips) if self.flips else 1

    @property
    def target_epochs(self) -> int:
        return target_epochs(self.fp.n["train"], self.train["batch_size"])

    @property
    def margin(self) -> float:
        return STARTUP_S + RESERVE * self._budget()

    def _budget(self) -> float:
        if self.budget_s is None:
            raise ConfigError("the planner's budget rules need a budget")
        return self.budget_s

    def elapsed(self) -> float:
        return self.clock() - self.started

    @property
    def pooled(self) -> int:
        """Training and validation cases together (what cross-validation deals into folds)."""
        return self.fp.n["train"] + self.fp.n["val"]

    def epoch_seconds(self, r: ProbeResult, folds: int | None = None) -> float:
        """One steady epoch of one member (b of a fit's a + b*n): on the training split validated on the validation
        split, or (``folds`` k, default the planned ``self.folds``) of one fold model, trained on (k-1)/k of
        train+val and validated on the rest; the calibration's measured epoch scaled by the per-image rates from
        the sizes it ran on to these, else the per-image time plus ``EPOCH_FIXED_S``."""
        n = self.fp.n
        k = self.folds if folds is None else folds
        fold = n["train"] / r.train_img_per_s + n["val"] / r.val_img_per_s
        if k:
            held = self.pooled / k
            fold = (self.pooled - held) / r.train_img_per_s + held / r.val_img_per_s
        if r.epoch_seconds:     # a measured steady epoch (its overheads included)
            ran = r.epoch_train_n / r.train_img_per_s + r.epoch_val_n / r.val_img_per_s
            return r.epoch_seconds * fold / ran if ran > 0 else r.epoch_seconds
        return fold + EPOCH_FIXED_S

    def fit_seconds(self, r: ProbeResult, epochs: int, folds: int | None = None) -> float:
        """One member's fit of ``epochs`` epochs: a + b*epochs, a the calibration's measured cost of a fit besides
        its epochs (else ``FIT_FIXED_S``), b ``epoch_seconds``."""
        return self.fixed_seconds(r) + epochs * self.epoch_seconds(r, folds)

    def fixed_seconds(self, r: ProbeResult) -> float:
        return r.fixed_seconds if r.fixed_seconds is not None else FIT_FIXED_S

    @property
    def explain_configured(self) -> tuple[int, int]:
        """(selection, scoring) images as configured; no selection images where the method is fixed."""
        return (0 if self.explain.method else self.explain.select_images), self.explain.score_images

    def explain_images(self, r: ProbeResult, k: int) -> tuple[int, int]:
        """(selection, scoring) images of the report's explanation section: the configured ones, or proportionally
        fewer (at least ``EXPLAIN_MIN``) where these would take more than ``EXPLAIN_SHARE`` of the budget for a
        k-member model at ``r``'s inference speed. No selection images where the method is fixed."""
        select, score = self.explain_configured
        full = self.explain_seconds(r, k, select, score)
        cap = EXPLAIN_SHARE * self.budget_s if self.budget_s else math.inf
        if full <= cap:
            return select, score
        f = cap / full
        return (max(min(select, EXPLAIN_MIN[0]), int(select * f)), max(min(score, EXPLAIN_MIN[1]), int(score * f)))

    def explain_seconds(self, r: ProbeResult, k: int, select: int | None = None, score: int | None = None) -> float:
        """The report's explanation section of a k-member model (``explain_images`` unless given)."""
        if select is None or score is None:
            select, score = self.explain_images(r, k)
        return EXPLAIN_FORWARDS * (select * EXPLAIN_CANDIDATES + score) * k / r.val_img_per_s

    def post_seconds(self, r: ProbeResult, k: int, folds: int | None = None) -> float:
        """Predictions of val + test per member and flip, the report's explanation section, plus the fixed work
        after fitting; under cross-validation also each fold model's prediction of its held-out part (every
        train+val case once)."""
        n = self.fp.n
        oof = self.tta_views * self.pooled / r.val_img_per_s if (self.folds if folds is None else folds) else 0.0
        return (POST_FIXED_S + POST_PER_CLASS_S * max(self.fp.n_classes, 2)
                + 2 * k * self.tta_views * (n["val"] + n["test"]) / r.val_img_per_s + oof
                + self.explain_seconds(r, k))

    def available(self, load: float) -> float:
        """Seconds left for fitting + evaluation after planning, loading (x1.2) and the margin."""
        return self._budget() - self.planned_at - 1.2 * load - self.margin

    # ------------------------------------------------------------ from the budget and the measured speeds
    def determine_precision(self, speeds: dict[str, ProbeResult]) -> str:
        """The faster of the measured precisions (``speeds``: precision -> probe at the native size)."""
        prec = max(("bf16-mixed", "32"), key=lambda p: speeds[p].train_img_per_s)
        fast, slow = speeds[prec], speeds["32" if prec != "32" else "bf16-mixed"]
        self.train["precision"] = prec
        return self.decide("train.precision", prec,
                           f"measured {fast.train_img_per_s:.0f} img/s with {prec} against "
                           f"{slow.train_img_per_s:.0f} with {slow.precision} (training steps on real batches)")

    def determine_resolution(self, res: dict[int, tuple[ProbeResult, float]],
                             calibrate: Callable[[int], ProbeResult]) -> tuple[int, ProbeResult]:
        """The largest on-disk resolution whose one member at the target epochs fits, else the native one
        (``res``: size -> (probe, loading seconds)). ``calibrate(size)`` then measures one whole real epoch
        of the choice, so the fitted epochs rest on a measured epoch; returns (size, that measurement)."""
        native, e_star = self.fp.image_shape[0], self.target_epochs
        self.planned_at = self.elapsed()
        choice, reasons = native, []
        for size in sorted(res):
            r, ls_ = res[size]
            need = self.fit_seconds(r, e_star) / SAFETY + self.post_seconds(r, 1)
            reasons.append(f"{size} px: {self.epoch_seconds(r):.1f} s/epoch, {e_star} epochs need "
                           f"{format_seconds(need)}")
            if size != native and need <= self.available(ls_):
                choice = size
        cal = calibrate(choice)
        self.planned_at = self.elapsed()
        self.image_size = choice
        load_c = res[choice][1]
        self.decide("data.size", choice,
                    "on disk: " + ", ".join(f"{s} px" for s in sorted(res)) + "; measured " + "; ".join(reasons)
                    + f"; fitting + evaluation may take {format_seconds(self.available(load_c))} -> {choice} px"
                    + (" (the larger resolutions do not fit)" if len(res) > 1 and choice == native else ""))
        return choice, cal

    def determine_validation(self, r: ProbeResult, load: float) -> int:
        """``train.cv_folds``: k-fold cross-validation on train+val pooled (k = 5, 4 or 3: the most whose fold
        models each get at least half their target epochs within the budget) when train+val holds fewer than
        ``CV_MAX_POOLED`` cases, else 0 (the holdout validation split). The folds are dealt by patient where the
        data name patients; the official test split is never part of them."""
        fp, pooled = self.fp, self.pooled
        if pooled >= CV_MAX_POOLED:
            self.folds = 0
            return self.decide("train.cv_folds", 0,
                               f"train+val {pooled} >= {CV_MAX_POOLED} cases: the holdout validation split of "
                               f"{fp.n['val']} is large enough to choose epochs and the threshold on (binomial "
                               f"standard error of an accuracy <= {0.5 / math.sqrt(max(fp.n['val'], 1)):.3f}), and "
                               "k fold models would cost k members' time")
        left, half = self.available(load), max(1, math.ceil(self.target_epochs / 2))
        fits = []
        for k in CV_FOLDS:
            need = k * self.fit_seconds(r, half, k) / SAFETY + self.post_seconds(r, k, k)
            fits.append(f"{k} folds need {format_seconds(need)}")
            if need <= left:
                self.folds = k
                break
        else:
            self.folds = 0
            return self.decide("train.cv_folds", 0,
                               f"train+val {pooled} < {CV_MAX_POOLED} cases would call for cross-validation, but "
                               f"at {half} epochs per fold model (half the target) " + ", ".join(fits) + " and "
                               f"{format_seconds(left)} are left: the holdout validation split of {fp.n['val']} "
                               "is kept")
        k = self.folds
        by = ("by patient (patient ids in the data: no patient in two folds)" if fp.patient_ids else
              "by image: the data name no patients (no two images share a patient id), so a patient with "
              "several images may fall in two folds")
        return self.decide("train.cv_folds", k,
                           f"train+val {pooled} < {CV_MAX_POOLED} cases (validation split alone {fp.n['val']}): "
                           f"pooled and dealt into {k} folds {by}, stratified by class; the {k} fold models "
                           "are the ensemble, each fold's best epoch is chosen on its held-out part, calibration "
                           f"and threshold on the out-of-fold predictions of all {pooled} cases; the official "
                           f"test split ({fp.n['test']}) is never part of a fold"
                           + (f" ({', '.join(fits)}; five do not fit)" if k != CV_FOLDS[0] else ""))

    def determine_epochs(self, r: ProbeResult, load: float, budget_text: str) -> int:
        """Epochs per member (and, with them, how many members fit: ``determine_ensemble`` records it): as
        many members as fit at the target epochs (under cross-validation, the k fold models), then the rest of
        the budget spread over them as more epochs (``fill_epochs``). A budget that does not hold one epoch is
        refused in one line naming the minimum."""
        ep_s, left, n_tr, bs = self.epoch_seconds(r), self.available(load), self.fp.n["train"], \
            self.train["batch_size"]
        e_star = self.target_epochs
        one_epoch_need = self.planned_at + 1.2 * load + self.margin + self.fit_seconds(r, 1) / SAFETY \
            + self.post_seconds(r, 1)
        if left - self.post_seconds(r, 1) < self.fit_seconds(r, 1) / SAFETY:
            raise ConfigError(f"budget {budget_text} is too small: one epoch of the smallest plan takes {ep_s:.0f}s "
                              f"(planning {self.planned_at:.0f}s, loading {load:.0f}s, evaluation "
                              f"{self.post_seconds(r, 1):.0f}s); give at least "
                              f"{format_seconds(one_epoch_need * 1.1)}")
        if self.folds:   # the fold models are the members: the budget buys their epochs
            k, ep_f = self.folds, self.epoch_seconds(r)
            epochs, note = self.fill_epochs(k, ep_f, left, r)
            self.members, self.epochs = k, epochs
            self.steps = epochs * math.ceil((self.pooled - self.pooled / k) / bs)
            return self.decide("train.epochs", epochs,
                               f"{epochs} epochs x {math.ceil((self.pooled - self.pooled / k) / bs)} steps = "
                               f"{self.steps} steps per fold model (target {TARGET_STEPS} steps: {e_star} epochs); "
                               f"{k} fold models, {ep_f:.1f} s per fold epoch (scaled from the measured "
                               f"{self.epoch_seconds(r, 0):.1f} s)" + note)
        k = 0
        for kk in range(MAX_MEMBERS, 0, -1):
            if kk * self.fit_seconds(r, e_star) / SAFETY + self.post_seconds(r, kk) <= left:
                k = kk
                break
        epochs, note = self.fill_epochs(max(k, 1), ep_s, left, r)
        self.members, self.epochs = max(k, 1), epochs
        self.steps = epochs * math.ceil(n_tr / bs)
        return self.decide("train.epochs", epochs,
                           f"{epochs} epochs x {math.ceil(n_tr / bs)} steps = {self.steps} steps per member "
                           f"(target {TARGET_STEPS} steps: {e_star} epochs); measured {ep_s:.1f} s per epoch" + note)

    def fill_epochs(self, k: int, ep_s: float, left: float, r: ProbeResult) -> tuple[int, str]:
        """Epochs per member when ``k`` members share what is left for fitting (SAFETY of it, after the
        evaluation of k members): all of it, up to ``MAX_EPOCH_FACTOR`` times the target epochs (issue 30 item 3:
        the whole budget); returns (epochs, what the reason adds)."""
        e_star = self.target_epochs
        fit = SAFETY * (left - self.post_seconds(r, k)) - k * self.fixed_seconds(r)
        can = int(max(1, fit / (k * ep_s)))
        epochs = min(can, MAX_EPOCH_FACTOR * e_star)
        if epochs < e_star:
            return epochs, " - fewer than the target: the budget allows no more"
        if epochs == e_star:
            return epochs, ""
        if can > MAX_EPOCH_FACTOR * e_star:
            return epochs, (f"; the budget would buy {can}: capped at {MAX_EPOCH_FACTOR}x the target "
                            f"({format_seconds(fit - k * epochs * ep_s)} of the budget left unused)")
        return epochs, f"; the budget's rest after {k} x {e_star} target epochs buys {epochs - e_star} more each"

    def determine_ensemble(self, r: ProbeResult, load: float) -> int:
        k, fit = self.members, self.fit_seconds(r, self.epochs)
        if self.folds:
            return self.decide("train.ensemble", k,
                               f"the {k} fold models of the cross-validation (seeds {self.seed}..{self.seed + k - 1}, "
                               f"soft voting), each ~{format_seconds(fit)}")
        return self.decide("train.ensemble", k,
                           f"each member needs ~{format_seconds(fit)}; "
                           f"{format_seconds(self.available(load))} left for fitting and evaluation -> {k} "
                           f"member(s) (seeds {self.seed}..{self.seed + k - 1}, soft voting; at most {MAX_MEMBERS}, "
                           "members only once each has its target epochs)")

    def determine_max_minutes(self, r: ProbeResult, load: float) -> float:
        """``train.max_minutes``: fitting capped where the run would overrun its budget by ``OVERRUN`` (the planned
        fitting ends well before: it fills ``SAFETY`` of what is left after the ``RESERVE``)."""
        k, post = self.members, self.post_seconds(r, self.members)
        fit_s = self.available(load) - post + (RESERVE + OVERRUN) * self._budget()
        max_minutes = round(fit_s / 60, 2)
        planned = k * self.fit_seconds(r, self.epochs)
        return self.decide("train.max_minutes", max_minutes,
                           f"budget {format_seconds(self._budget())} = planning {self.planned_at:.0f}s + loading "
                           f"~{1.2 * load:.0f}s + evaluation/explanations/report ~{post:.0f}s + start-up "
                           f"{STARTUP_S:.0f}s + fitting; planned fitting {planned:.0f}s (the planned total "
                           f"{self.planned_total(r, load) / self._budget():.0%} of the budget), capped at "
                           f"{fit_s:.0f}s (where the run would overrun its budget by {OVERRUN:.0%})")

    def planned_total(self, r: ProbeResult, load: float) -> float:
        """The planned wall time of the whole ``train --auto`` run, start-up included."""
        return self.estimates(r, load)["total_s"] + STARTUP_S

    def determine_ema(self) -> float | None:
        steps = self.steps
        ema = ema_decay(steps)
        return self.decide("train.ema", ema,
                           f"{steps} steps per member: weight average with a half-life of ~"
                           f"{math.log(2) / (1 - ema):.0f} steps (a quarter of training) smooths the last epochs"
                           if ema else f"only {steps} steps: too few for a weight average to settle")

    def determine_mixup(self) -> float:
        mix = self.steps >= 3000
        return self.decide("train.mixup", 0.2 if mix else 0.0,
                           "members get >= 3000 steps: mixup 0.2 regularises long training" if mix else
                           f"{self.steps} steps per member: mixup slows convergence more than it regularises at "
                           "this length")

    def determine_cutmix(self) -> float:
        img, mix = self.image_size, self.steps >= 3000
        cut = mix and self.fp.spatial_dims == 2 and img >= 64
        return self.decide("train.cutmix", 1.0 if cut else 0.0,
                           "2D >= 64 px with long training: cutmix 1.0" if cut else
                           (f"{img} px inputs: a pasted patch hides most of a small lesion" if img < 64 else
                            f"{self.steps} steps per member: too short for cutmix"))

    def determine_progressive(self) -> dict | None:
        img = self.image_size
        if self.model == "vit":     # position embeddings of a fixed patch grid: the input size cannot change
            return self.decide("train.progressive", None,
                               "the vision transformer's patch grid and position embeddings fix its input size: "
                               "no downsampled early epochs")
        prog = self.fp.spatial_dims == 2 and img >= 64 and self.epochs >= 30
        return self.decide("train.progressive", {"start": 0.5, "fraction": 0.3} if prog else None,
                           "large inputs and >= 30 epochs: the first 30% of epochs at reduced size buy speed"
                           if prog else f"{img} px {'volumes' if self.fp.spatial_dims == 3 else 'images'}, "
                           f"{self.epochs} epochs: downsampled early epochs would save little and lose detail")

    def determine_tta(self) -> bool:
        flips = self.flips
        tta = bool(flips)
        return self.decide("evaluation.tta", tta,
                           f"averages predictions over the training flips ({', '.join(flips)}): the network was "
                           "taught they do not change the label" if tta else "no flips in training augmentation")

    def determine_threshold(self) -> str:
        fp = self.fp
        on = (f"the out-of-fold predictions of all {self.pooled} train+val cases (each predicted by the fold model "
              f"that did not train on it)" if self.folds else f"the validation split ({fp.n['val']} images)")
        return self.decide("evaluation.threshold", "youden",
                           f"binary: Youden's J on {on} balances sensitivity and specificity under imbalance; "
                           "calibration is chosen on the same predictions" if get_task(fp.task).has_threshold else
                           f"{fp.task}: decisions are argmax/0.5 (the rule applies to binary tasks only); "
                           f"calibration is chosen on {on}")

    def determine_explanations(self, r: ProbeResult) -> dict:
        """``explain.select_images`` / ``explain.score_images``: the report's explanation section within
        ``EXPLAIN_SHARE`` of the budget (``explain_images``)."""
        k, e = self.members, self.explain
        select, score = self.explain_images(r, k)
        full = self.explain_seconds(r, k, *self.explain_configured)
        what = (f"the method fixed ({e.method}): {score} test images score it" if e.method else
                f"the most faithful of {EXPLAIN_CANDIDATES} methods chosen on {select} validation images, scored on "
                f"{score} test images")
        if (select, score) == self.explain_configured:
            why = f"{what}: ~{self.explain_seconds(r, k):.0f}s for {k} member(s) at {r.val_img_per_s:.0f} img/s"
        else:
            why = (f"{what}, fewer than the configured {e.select_images}/{e.score_images}: those would take "
                   f"~{full:.0f}s for {k} member(s) at {r.val_img_per_s:.0f} img/s, more than {EXPLAIN_SHARE:.0%} "
                   f"of the budget; ~{self.explain_seconds(r, k):.0f}s")
        value = {"select_images": max(select, 2), "score_images": score}
        return self.decide("explain", value, why)

    def estimates(self, r: ProbeResult, load: float) -> dict[str, float]:
        k, post, member = self.members, self.post_seconds(r, self.members), self.fit_seconds(r, self.epochs)
        return {"planning_s": round(self.elapsed(), 1), "load_s": round(load, 1),
                "epoch_s": round(self.epoch_seconds(r), 2), "fit_fixed_s": round(self.fixed_seconds(r), 2),
                "member_fit_s": round(member, 1), "fit_s": round(k * member, 1), "post_s": round(post, 1),
                "explain_s": round(self.explain_seconds(r, k), 1), "margin_s": round(self.margin, 1),
                "total_s": round(self.planned_at + 1.2 * load + k * member + post, 1)}
