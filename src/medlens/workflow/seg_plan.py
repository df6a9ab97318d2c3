"""Segmentation plans (issue 30 item 6): ``medlens plan`` / ``train --auto`` on image/mask pairs.

``make_seg_plan(source, budget)`` reads a segmentation experiment YAML's ``data:`` section or a folder of image/mask
pairs (2D pictures or volumes; the pairing is found from the file names and checked on the pixels:
``detect_pairs``), loads the cases, fingerprints them (``engine.seg_planner.seg_fingerprint``), times real patch
training steps and whole-image inference on this machine (``engine.seg_planner.probe_segmentation``; this machine's
figures are stored once per workload by ``engine.probe.MachineFigures`` and reused, so the same data, budget and
seed give the same plan) and returns an ordinary segmentation ``ExperimentConfig`` whose ``plan:`` section holds
the fingerprint, the measured speeds and every decision with its reason. The rules are
``engine.seg_planner.SegPlanner``; this module orchestrates. The test cases are counted, never read.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from medlens.config import (
    ExperimentConfig,
    SegmentationConfig,
    TrainConfig,
    apply_override,
    config_from_dict,
    load_config,
)
from medlens.engine.planner import parse_budget
from medlens.engine.probe import MachineFigures, ProbeResult
from medlens.engine.seg_planner import (
    MIN_BATCH,
    SegPlan,
    SegPlanner,
    probe_segmentation,
    seg_fingerprint,
)
from medlens.errors import ConfigError, DataError
from medlens.io import load
from medlens.io.formats import IMAGE_SUFFIXES, is_image_file, suffix_of
from medlens.tasks import config_task
from medlens.transforms.preprocess import prepared_segmentation

__all__ = ["detect_pairs", "is_segmentation_input", "make_seg_plan"]

_SEP = "_-. "
_NEIGHBOURS = 8       # files compared with each file in name order (pairs sort next to each other)
MAX_MASK_VALUES = 16


def _stem(name: str) -> str:
    """The file name without its image suffix (``.nii.gz`` whole), as the folder source pairs files."""
    suf = suffix_of(name)
    return name[: -len(suf)] if suf in IMAGE_SUFFIXES else Path(name).stem


def _yaml_task(path: Path) -> str | None:
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None   # base_config reports the file's problem
    return str(d.get("task")) if isinstance(d, dict) and d.get("task") is not None else None


def is_segmentation_input(source: str | Path, overrides: list[str] | None = None) -> bool:
    """Whether ``medlens plan SOURCE`` plans a segmentation: a YAML with ``task: segmentation``, a folder with
    ``--set data.mask_suffix=...``, or a folder holding image files itself (a classification folder holds them in
    one sub-folder per class)."""
    p = Path(str(source))
    if p.suffix.lower() in (".yaml", ".yml"):
        return p.is_file() and _yaml_task(p) == "segmentation"
    if not p.is_dir():
        return False
    if any(o.strip().startswith("data.mask_suffix=") for o in overrides or []):
        return True
    try:
        return any(f.is_file() and is_image_file(f) for f in p.iterdir())
    except OSError:
        return False


def _mask_like(path: Path) -> bool:
    """A label map: whole numbers, 0 among them, at most ``MAX_MASK_VALUES`` distinct values, one channel."""
    try:
        img = load(path)
    except Exception:   # noqa: BLE001 - an unreadable file is simply not a mask here
        return False
    a = np.asarray(img.array)
    if img.is_rgb:
        if a.shape[-1] < 3 or not (a[..., :3] == a[..., :1]).all():
            return False
        a = a[..., 0]
    vals = np.unique(a)
    return bool(len(vals) <= MAX_MASK_VALUES and vals.size and vals[0] == 0 and np.all(vals == np.round(vals)))


def _prefix(a_stem: str, b_name: str) -> str:
    p = os.path.commonprefix([a_stem, b_name])
    if p == a_stem:
        return p
    cut = max(p.rfind(c) for c in _SEP)
    return p[:cut] if cut > 0 else ""


def detect_pairs(root: Path) -> dict:
    """The folder source's pairing of ``root``: ``{image_suffix, mask_suffix[, reference_suffix]}``. Candidates
    come from file names (``<stem><image_suffix>.<ext>`` beside ``<stem><mask_suffix>``); the one pairing the most
    stems whose masks are label maps (checked on two files each side) wins; a second mask suffix pairing the same
    images is the second observer (``reference_suffix``). Images without masks are refused in one line."""
    files = sorted(f for f in root.iterdir() if f.is_file() and is_image_file(f))
    if not files:
        raise DataError("no image files in the folder", root)
    cands: dict[tuple[str, str], set[str]] = {}
    for k, a in enumerate(files):
        for b in files[k + 1: k + 1 + _NEIGHBOURS]:
            for x, y in ((a, b), (b, a)):
                xs = _stem(x.name)
                pre = _prefix(xs, y.name)
                if pre and len(_stem(y.name)) > len(pre):
                    cands.setdefault((xs[len(pre):], y.name[len(pre):]), set()).add(pre)
    checked: dict[Path, bool] = {}

    def is_mask(p: Path) -> bool:
        if p not in checked:
            checked[p] = _mask_like(p)
        return checked[p]

    valid = []
    for (isuf, msuf), stems in sorted(cands.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(valid) >= 2 and len(stems) < len(valid[0][2]):
            break
        sample = sorted(stems)[:2]
        imgs = [next((f for f in files if _stem(f.name) == s + isuf), None) for s in sample]
        masks = [root / (s + msuf) for s in sample]
        if any(i is None for i in imgs) or not all(m.is_file() for m in masks):
            continue
        if all(is_mask(m) for m in masks) and not any(is_mask(i) for i in imgs if i is not None):
            valid.append((isuf, msuf, stems))
    if not valid:
        raise DataError(f"{len(files)} image files but no masks beside them (a mask: <image stem><suffix>, a label "
                        f"map of at most {MAX_MASK_VALUES} whole values with 0 as background); a segmentation plan "
                        "needs image/mask pairs", root)
    isuf, msuf, stems = valid[0]
    out = {"image_suffix": isuf, "mask_suffix": msuf}
    second = next((v for v in valid[1:] if v[0] == isuf and v[2] == stems), None)
    if second is not None:
        out["reference_suffix"] = second[1]
    return out


class _Clock:
    def __init__(self) -> None:
        self.spent = 0.0

    def add(self, s: float) -> float:
        self.spent += s
        return s


def _base(source: str | Path, overrides: list[str]) -> tuple[ExperimentConfig, str | None, bool | None]:
    """The experiment the plan starts from, and the colour mode and CLAHE the user gave (None: the planner
    decides)."""
    p = Path(str(source))
    data_ov = [o for o in overrides if o.strip().startswith("data.")]
    if p.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(p, data_ov)
        if not config_task(cfg.task).dense:
            raise ConfigError(f"the segmentation planner plans segmentation; this config's task is '{cfg.task}'", p)
        given = cfg.data.model_fields_set
        return (cfg.model_copy(update={"name": "auto_" + cfg.name}), cfg.data.color if "color" in given else None,
                cfg.data.clahe if "clahe" in given else None)
    given = {o.split("=", 1)[0].strip() for o in data_ov}
    data: dict = {"source": "folder", "path": str(p)}
    if "data.mask_suffix" not in given:
        data.update(detect_pairs(p))
    d: dict = {"name": "auto_" + (re.sub(r"[^A-Za-z0-9_.-]", "_", p.resolve().name).strip(".") or "seg"),
               "task": "segmentation", "data": data}
    for ov in data_ov:
        apply_override(d, ov)
    cfg = config_from_dict(d, str(source))
    return (cfg, cfg.data.color if "data.color" in given else None,
            cfg.data.clahe if "data.clahe" in given else None)


def _probe_key(kind: str, split, tc: TrainConfig, seg: SegmentationConfig, model: str, params: dict,
               max_seconds: float, seed: int) -> dict:
    return {"probe": kind, "task": "segmentation", "model": model, "params": params,
            "train": tc.model_dump(mode="json"), "segmentation": seg.model_dump(mode="json"),
            "shapes": [list(c.grid) for c in split.train], "channels": split.train[0].channels,
            "n": [len(split.train), len(split.val)], "max_seconds": round(max_seconds, 2), "seed": seed}


def make_seg_plan(source: str | Path, budget: str, *, seed: int = 0, overrides: list[str] | None = None,
                  log: Callable[[str], None] = lambda s: None, started: float | None = None,
                  recalibrate: bool = False) -> ExperimentConfig:
    """The planned segmentation experiment (``plan:`` filled); the arguments are ``workflow.plan.make_plan``'s."""
    t0 = started if started is not None else time.monotonic()
    budget_s = parse_budget(budget)
    overrides = list(overrides or [])
    cfg0, color_given, clahe_given = _base(source, overrides)
    figs = MachineFigures(recalibrate=recalibrate, log=log)
    clock = _Clock()
    if started is not None:
        clock.add(figs.seconds({"before planning": "train --auto"}, time.monotonic() - t0))
    dc = cfg0.data
    tl = time.monotonic()
    split = prepared_segmentation(dc, cfg0.segmentation, seed=seed)
    if not split.train or not split.val or not split.test:
        raise DataError(f"a segmentation plan needs cases in every split: train {len(split.train)}, val "
                        f"{len(split.val)}, test {len(split.test)}", dc.resolved_path())
    n_test = len(split.test)
    split.test = []   # counted, never read again while planning
    load_s = clock.add(figs.seconds({"load": dc.model_dump(mode="json"), "task": "segmentation"},
                                    time.monotonic() - tl))
    tf = time.monotonic()
    fp = seg_fingerprint(split, dc.source, str(source), dc.modality, seed=seed)
    fp.n["test"] = n_test
    clock.add(figs.seconds({"fingerprint": dc.model_dump(mode="json"), "task": "segmentation", "seed": seed},
                           time.monotonic() - tf))
    planner = SegPlanner(fp, budget_s, seed=seed, color_given=color_given, clahe_given=clahe_given)
    planner.plan_from_fingerprint()
    planner.load_s = load_s
    per_probe = float(min(6.0, max(1.0, 0.01 * budget_s)))
    n_out = 1 if fp.n_classes == 2 else fp.n_classes
    dims = fp.spatial_dims

    def seg_cfg(patch: list[int]) -> SegmentationConfig:
        return cfg0.segmentation.model_copy(update={**planner.seg, "patch_size": patch})

    warmed = []

    def measure(tc: TrainConfig, sc: SegmentationConfig, params: dict) -> ProbeResult:
        t = time.monotonic()
        if not warmed:   # the process's first steps and inference pay one-time costs: an untimed run first
            probe_segmentation(tc, sc, split, "unet", params, n_out, batches=2, max_seconds=0.5, seed=seed)
            warmed.append(True)
        r = probe_segmentation(tc, sc, split, "unet", params, n_out, max_seconds=per_probe, seed=seed)
        return replace(r, seconds=time.monotonic() - t)

    def measured(patch: list[int], batch: int, precision: str) -> tuple[ProbeResult, str]:
        params = planner.unet_params(patch)
        tc = TrainConfig(**{**planner.train, "batch_size": batch, "precision": precision, "epochs": 1})
        sc = seg_cfg(patch)
        key = _probe_key("steps", split, tc, sc, "unet", params, per_probe, seed)
        r, cached = figs.probe(key, lambda: measure(tc, sc, params))
        clock.add(r.seconds)
        note = " (this machine's stored figure)" if cached else ""
        log(f"probe unet {'x'.join(map(str, patch))} batch {batch} {precision}: {r.train_img_per_s:.1f} patches/s "
            f"training, {r.val_img_per_s:.2f} cases/s whole-image inference ({r.seconds:.1f} s){note}")
        return r, note

    p0 = planner.initial_patch()
    speeds = {prec: measured(p0, MIN_BATCH[dims], prec)[0] for prec in ("bf16-mixed", "32")}
    prec = planner.determine_precision(speeds)
    r0 = speeds[prec]
    planner.planned_at = clock.spent
    planner.determine_patch_size(r0.train_img_per_s * float(np.prod(p0)), planner.post_seconds(r0))
    planner.determine_network()
    r1 = r0 if planner.patch == p0 else measured(planner.patch, MIN_BATCH[dims], prec)[0]
    planner.planned_at = clock.spent
    planner.determine_batch_size(r1.train_img_per_s * float(np.prod(planner.patch)), planner.post_seconds(r1))
    planner.determine_epochs(r1, str(budget))
    d = cfg0.model_dump(mode="json")
    d["seed"] = seed
    d["data"] = {**d["data"], **planner.data}
    d["model"] = {**d.get("model", {}), **planner.model}
    d["train"] = {**d.get("train", {}), **planner.train}
    d["segmentation"] = {**d.get("segmentation", {}), **planner.seg}
    log(f"planning took {time.monotonic() - t0:.0f} s; budgeted {clock.spent:.0f} s from this machine's figures "
        f"({figs.reused} stored, {figs.measured} measured now; {figs.path})")
    plan = SegPlan(budget=str(budget), budget_seconds=budget_s, seed=seed, input=str(source), fingerprint=fp,
                   machine={**figs.machine, "figures": "measured once per workload on this machine and reused "
                                                       "(speeds, estimates.load_s; docs/auto.md)"},
                   speeds=[r.summary() for r in [*speeds.values()] + ([r1] if r1 is not r0 else [])],
                   estimates=planner.estimates(r1), decisions=planner.decisions)
    d["plan"] = plan.model_dump(mode="json")
    for ov in overrides:
        apply_override(d, ov)
    return config_from_dict(d, str(source))
