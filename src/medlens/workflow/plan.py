"""Self-configuring classification (issue 17): fingerprint a dataset, measure this machine, write a plan.

``make_plan(source, budget)`` reads a dataset (a MedMNIST-format ``.npz``, a catalogue entry ``name`` or
``name@size``, an image folder, a CSV manifest, an HDF5 patch store, or an experiment YAML whose ``data:``
section is used), fingerprints it (``medlens.data.fingerprint``), times real training steps of the candidate
networks, resolutions and precisions on real batches (``medlens.engine.probe``) and returns an ordinary
``ExperimentConfig`` whose ``plan:`` section records the budget, the fingerprint, the measured speeds and every
decision with its reason. The rules read only the fingerprint and the measured speed: no dataset is known by name.

The budget covers the whole of ``medlens train --auto``: planning (its probes), loading the data for training,
fitting (all ensemble members), and evaluation, explanations and the report, with a safety margin.
``train.max_minutes`` caps fitting at its share, so a slower-than-measured machine still finishes in time.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from medlens.config import DataConfig, ExperimentConfig, config_from_dict, load_config, apply_override
from medlens.data.fingerprint import Fingerprint, fingerprint
from medlens.errors import ConfigError, DataError

PLANNER_VERSION = 1
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}

# Measured on the 2-core reference machine (benchmarks/auto.py, docs/auto.md): what a run costs besides fitting.
# calibration, threshold, bootstrap CIs, plots, Grad-CAM section and the report: measured 30-32 s for binary and
# 54 s for 5-class 28 px runs on the 2-core machine while busy (docs/auto.md)
POST_FIXED_S = 20.0
POST_PER_CLASS_S = 7.0
EPOCH_FIXED_S = 0.4      # per epoch: checkpoints, history row, validation metrics
STARTUP_S = 10.0         # importing torch, Lightning and MONAI before the budget's clock can start
SAFETY = 0.85            # planned fitting uses at most this share of its time; the rest absorbs noise
TARGET_STEPS = 1200      # optimiser steps one member should get before the budget buys more members
MAX_MEMBERS = 5


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
    fingerprint: Fingerprint
    speeds: list[dict]
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


# ---------------------------------------------------------------- input
def base_config(source: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment the plan starts from: a YAML's own, or a fresh one around the data ``source`` names."""
    text = str(source)
    p = Path(text)
    if p.suffix.lower() in (".yaml", ".yml"):
        return load_config(p, [o for o in overrides or [] if o.startswith("data.")])
    if p.exists():
        suffix = p.suffix.lower()
        if p.is_dir():
            data = {"source": "folder", "path": text}
        elif suffix == ".npz":
            data = {"source": "medmnist", "path": text, "check_md5": False}
        elif suffix == ".csv":
            data = {"source": "csv", "path": text}
        elif suffix in (".h5", ".hdf5"):
            data = {"source": "hdf5", "path": text}
        else:
            raise DataError("not a dataset the planner reads (an .npz, image folder, .csv, .h5 or experiment .yaml)",
                            p)
        stem = p.name if p.is_dir() else p.stem
    else:
        from medlens.data.catalog import MEDMNIST

        name, _, size = text.partition("@")
        if name.lower() not in MEDMNIST:
            raise DataError(f"'{text[:80]}' is neither a file, a folder nor a catalogue dataset (medlens data list)")
        if size and not size.isdigit():
            raise DataError(f"'{text[:80]}': the size after @ must be a number of pixels (e.g. 64)")
        data = {"source": "medmnist", "name": name.lower(), "size": int(size or 28)}
        stem = name.lower() + (f"_{size}" if size else "")
    d: dict = {"name": "auto_" + re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip(".") or "auto", "data": data}
    for ov in overrides or []:
        if ov.startswith("data."):
            apply_override(d, ov)
    return config_from_dict(d, text)


def _npz_path(dc: DataConfig) -> Path | None:
    if dc.source != "medmnist":
        return None
    if dc.path:
        return dc.resolved_path()
    from medlens.data.medmnist import medmnist_path

    return medmnist_path(dc.name, dc.size)


def _resized(dc: DataConfig, size: int, files: dict[int, str]) -> DataConfig:
    """The same data at another on-disk resolution."""
    if dc.path:
        return dc.model_copy(update={"path": str(PurePosixPath(dc.path).with_name(Path(files[size]).name)),
                                     "size": size})
    return dc.model_copy(update={"size": size})


def load_for_plan(dc: DataConfig, seed: int):
    """Prepared splits as training will see them; a 3-channel MedMNIST-format file is read in colour."""
    from medlens.transforms.preprocess import prepared_data

    if dc.source == "medmnist" and dc.color == "gray":
        from medlens.data.medmnist import read_npz

        p = _npz_path(dc)
        if p is not None and p.exists():
            shape = read_npz(p)["train_images"].shape
            if len(shape) == 4 and shape[-1] == 3 and shape[1] > 3:   # (n, h, w, 3): colour images
                dc = dc.model_copy(update={"color": "rgb"})
    return dc, prepared_data(dc, seed=seed)


# ---------------------------------------------------------------- rules
def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1))))


def base_decisions(fp: Fingerprint) -> tuple[dict, list[Decision]]:
    """Settings that follow from the fingerprint alone (the budget decides the rest)."""
    D: list[Decision] = []
    t: dict[str, Any] = {}
    n = fp.n["train"]
    dims = fp.spatial_dims
    if dims == 3:
        model, params = "fast_cnn3d", {"widths": [16, 32, 64, 128], "dropout": 0.3}
        why = ("3D volumes: a 4-stage 3D CNN sized for CPU (global pooling, so it takes any input size and "
               "progressive resizing)")
    else:
        model, params = "small_cnn", {"widths": [32, 64, 128], "dropout": 0.3 if n < 2000 else 0.2}
        why = (f"2D images, {n} training samples: a 3-stage CNN (32/64/128) learns {fp.image_shape[0]} px inputs "
               "fast on a CPU; deeper ImageNet-style networks need far more steps than the budget buys")
        if n >= 20000:
            params["widths"] = [48, 96, 192]
            why = f"2D images, {n} training samples: enough data for a wider 3-stage CNN (48/96/192)"
    D.append(Decision(setting="model", value={"name": model, "params": params},
                      reason=why + f"; dropout {params['dropout']} ({'under' if n < 2000 else 'over'} 2000 "
                                   "training samples)"))
    hi = 32 if dims == 3 else 128
    bs = int(min(hi, max(16, _pow2_floor(n / 16))))
    t["batch_size"] = bs
    D.append(Decision(setting="train.batch_size", value=bs,
                      reason=f"n_train/16 rounded down to a power of two, within 16..{hi} ({dims}D): about 16+ "
                             "steps per epoch on small sets, full batches on large ones"))
    t["lr"], t["optimizer"], t["scheduler"] = 0.002, "adamw", "cosine"
    D.append(Decision(setting="train.optimizer", value="adamw, lr 0.002, cosine",
                      reason="AdamW with a cosine schedule converges in ~1000 steps at this batch size without "
                             "tuning; the schedule ends exactly at the planned epoch count"))
    wd = 0.001 if n < 2000 else 0.0005
    t["weight_decay"] = wd
    D.append(Decision(setting="train.weight_decay", value=wd,
                      reason=f"{n} training samples: {'stronger' if n < 2000 else 'moderate'} regularisation"))
    # augmentation
    if dims == 3:
        aug = {"hflip": 0.5, "vflip": 0.5, "rotate": 10, "translate": 0.05, "scale": 0.05}
        why = "volumes: flips in-plane and small rotations/shifts keep anatomy plausible"
    elif fp.field_of_view == "circular":
        aug = {"hflip": 0.5, "vflip": 0.5, "rotate": 20, "translate": 0.05, "scale": 0.1, "brightness": 0.1,
               "contrast": 0.15}
        why = (f"dark corners (corner/centre intensity {fp.intensity.corner_to_centre:.2f}): a circular field of "
               "view, content without a canonical orientation -> both flips and larger rotations; colour jitter")
    else:
        aug = {"hflip": 0.5, "rotate": 10, "translate": 0.08, "scale": 0.1, "brightness": 0.1, "contrast": 0.1}
        why = ("full field of view with a canonical up direction (radiograph-like): horizontal flips and small "
               "affine, brightness/contrast jitter")
    if fp.intensity.distinct_values <= 16:
        aug.pop("brightness", None)
        aug.pop("contrast", None)
        why += f"; no intensity jitter ({fp.intensity.distinct_values} distinct values: mask-like inputs)"
    t["augment"] = aug
    D.append(Decision(setting="train.augment", value=aug, reason=why))
    # imbalance and labels
    limit = 1.5 if fp.task == "binary" else 10.0
    if fp.task != "multilabel" and fp.imbalance_ratio > limit:
        t["imbalance"] = "weighted_loss"
        D.append(Decision(setting="train.imbalance", value="weighted_loss",
                          reason=f"training classes {fp.class_counts['train']}: imbalance {fp.imbalance_ratio:.2f} "
                                 f"> {limit:g} -> loss weighted by inverse class frequency (keeps every sample, "
                                 "unlike undersampling)" + ("; the binary threshold is chosen on validation anyway"
                                                            if fp.task == "binary" else "")))
    else:
        t["imbalance"] = "none"
        why = (f"imbalance {fp.imbalance_ratio:.2f} <= {limit:g}: plain loss" if fp.task != "multilabel" else
               "multi-label: plain per-label loss")
        if fp.task in ("multiclass", "ordinal") and fp.imbalance_ratio > 1.5:
            why += (" (multi-class decisions are argmax: weighting would trade accuracy on frequent classes for "
                    "recall of rare ones; it is used only past 10:1, where a class would otherwise be ignored)")
        D.append(Decision(setting="train.imbalance", value="none", reason=why))
    ls = 0.1 if fp.task in ("multiclass", "ordinal") else 0.0
    t["label_smoothing"] = ls
    D.append(Decision(setting="train.label_smoothing", value=ls,
                      reason=f"{fp.n_classes} classes ({fp.task}): smoothing 0.1 against over-confident neighbours"
                      if ls else f"{fp.task}: no smoothing (the binary threshold is chosen on calibrated scores)"))
    t["monitor"] = "val_auc"
    D.append(Decision(setting="train.monitor", value="val_auc",
                      reason=f"validation split of {fp.n['val']} images: the best-AUC epoch is kept (threshold-free, "
                             "insensitive to imbalance)"))
    return {"model": model, "params": params, "train": t}, D


def target_epochs(n_train: int, batch: int) -> int:
    """Epochs giving one member about ``TARGET_STEPS`` optimiser steps (15..100)."""
    return int(min(100, max(15, math.ceil(TARGET_STEPS * batch / max(n_train, 1)))))


def ema_decay(steps: int) -> float | None:
    if steps < 200:
        return None
    return round(min(0.9995, max(0.99, 1 - 1 / (0.25 * steps))), 4)


# ---------------------------------------------------------------- planning
def make_plan(source: str | Path, budget: str, *, seed: int = 0, overrides: list[str] | None = None,
              log: Callable[[str], None] = lambda s: None, started: float | None = None) -> ExperimentConfig:
    """The planned experiment config (``plan:`` filled). ``started``: when the budget's clock started
    (``time.monotonic()``; default now)."""
    from medlens.config import TrainConfig
    from medlens.engine.probe import probe

    t0 = started if started is not None else time.monotonic()
    budget_s = parse_budget(budget)
    cfg0 = base_config(source, overrides)
    if cfg0.task != "classification":
        raise ConfigError(f"the planner plans classifiers; this config's task is '{cfg0.task}'", str(source))
    tl = time.monotonic()
    dc, data = load_for_plan(cfg0.data, seed)
    load_s = time.monotonic() - tl
    fp = fingerprint(data, dc.source, str(source), _npz_path(dc), seed=seed)
    base, D = base_decisions(fp)
    tbase = dict(base["train"])
    bs = tbase["batch_size"]
    n_tr, n_val, n_te = fp.n["train"], fp.n["val"], fp.n["test"]
    per_probe = float(min(8.0, max(2.0, 0.015 * budget_s)))

    def trial(ds, precision: str):
        tc = TrainConfig(**{**tbase, "epochs": 2, "precision": precision})
        r = probe(tc, ds, base["model"], base["params"], max_seconds=per_probe, seed=seed)
        log(f"probe {base['model']} {'x'.join(map(str, r.size))} {precision}: {r.train_img_per_s:.1f} img/s "
            f"training, {r.val_img_per_s:.0f} img/s inference ({r.seconds:.1f} s)")
        return r

    speeds = {("native", "bf16-mixed"): trial(data, "bf16-mixed"), ("native", "32"): trial(data, "32")}
    prec = max(("bf16-mixed", "32"), key=lambda p: speeds[("native", p)].train_img_per_s)
    fast, slow = speeds[("native", prec)], speeds[("native", "32" if prec != "32" else "bf16-mixed")]
    D.append(Decision(setting="train.precision", value=prec,
                      reason=f"measured {fast.train_img_per_s:.0f} img/s with {prec} against "
                             f"{slow.train_img_per_s:.0f} with {slow.precision} (training steps on real batches)"))
    native = fp.image_shape[0]
    res = {native: (fast, data, dc, load_s)}
    for size in fp.resolutions_on_disk:
        if native < size <= 4 * native and fp.spatial_dims in (2, 3):
            dcs = _resized(dc, size, fp.resolution_files)
            tl = time.monotonic()
            _, ds = load_for_plan(dcs, seed)
            ls_ = time.monotonic() - tl
            if ds.train.image_shape[0] != size:
                continue
            res[size] = (trial(ds, prec), ds, dcs, ls_)
            del ds

    def epoch_s(r) -> float:
        est = n_tr / r.train_img_per_s + n_val / r.val_img_per_s + EPOCH_FIXED_S
        return max(est, r.epoch_seconds + EPOCH_FIXED_S) if r.epoch_seconds else est

    def post_s(r, k: int, tta: int) -> float:   # predictions of val + test per member and flip, plus fixed work
        return (POST_FIXED_S + POST_PER_CLASS_S * max(fp.n_classes, 2)
                + 2 * k * tta * (n_val + n_te) / r.val_img_per_s)

    flips = [a for a in ("hflip", "vflip") if tbase["augment"].get(a)]
    tta_n = 1 + len(flips) if flips else 1
    e_star = target_epochs(n_tr, bs)
    margin = STARTUP_S + max(10.0, 0.05 * budget_s)
    planned_at = time.monotonic() - t0

    def avail(load: float) -> float:          # seconds left for fitting + post after planning/loading/margin
        return budget_s - planned_at - 1.2 * load - margin

    # resolution: the largest whose one member at e_star epochs fits, else the native one
    choice, reasons = native, []
    for size in sorted(res):
        r, _, _, ls_ = res[size]
        need = e_star * epoch_s(r) / SAFETY + post_s(r, 1, tta_n)
        reasons.append(f"{size} px: {epoch_s(r):.1f} s/epoch, {e_star} epochs need {format_seconds(need)}")
        if size != native and need <= avail(ls_):
            choice = size
    r, data_c, dc_c, load_c = res[choice]
    # calibration: one whole real epoch (all training batches, the whole validation split) of the chosen setting,
    # so the fitted epochs rest on a measured epoch and not on extrapolated steps
    tc = TrainConfig(**{**tbase, "epochs": 2, "precision": prec})
    cal = probe(tc, data_c, base["model"], base["params"], full_epoch=True, seed=seed,
                max_seconds=max(per_probe, 0.04 * budget_s))
    log(f"calibration epoch at {choice} px: " + (f"{cal.epoch_seconds:.1f} s" if cal.epoch_seconds else
                                                   f"stopped after {cal.seconds:.0f} s; "
                                                   f"{cal.train_img_per_s:.1f} img/s"))
    r = cal
    planned_at = time.monotonic() - t0
    D.append(Decision(setting="data.size", value=choice,
                      reason=("on disk: " + ", ".join(f"{s} px" for s in sorted(res)) + "; measured " +
                              "; ".join(reasons) + f"; fitting + evaluation may take {format_seconds(avail(load_c))}"
                              f" -> {choice} px" + (" (the larger resolutions do not fit)" if len(res) > 1 and
                                                   choice == native else ""))))
    # epochs and ensemble
    ep_s = epoch_s(r)
    left = avail(load_c)
    one_epoch_need = planned_at + 1.2 * load_c + margin + ep_s / SAFETY + post_s(r, 1, tta_n)
    if left - post_s(r, 1, tta_n) < ep_s / SAFETY:
        raise ConfigError(f"budget {budget} is too small: one epoch of the smallest plan takes {ep_s:.0f}s "
                          f"(planning {planned_at:.0f}s, loading {load_c:.0f}s, evaluation "
                          f"{post_s(r, 1, tta_n):.0f}s); give at least {format_seconds(one_epoch_need * 1.1)}")
    k, epochs = 1, e_star
    for kk in range(MAX_MEMBERS, 0, -1):
        if kk * e_star * ep_s / SAFETY + post_s(r, kk, tta_n) <= left:
            k = kk
            break
    else:
        epochs = max(1, int(SAFETY * (left - post_s(r, 1, tta_n)) / ep_s))
    if k == 1 and epochs == e_star:  # a single member: spend what a second could not use on more epochs
        epochs = int(min(2 * e_star, SAFETY * (left - post_s(r, 1, tta_n)) / ep_s))
    steps = epochs * math.ceil(n_tr / bs)
    D.append(Decision(setting="train.epochs", value=epochs,
                      reason=f"{epochs} epochs x {math.ceil(n_tr / bs)} steps = {steps} steps per member (target "
                             f"{TARGET_STEPS} steps: {e_star} epochs); measured {ep_s:.1f} s per epoch"
                             + ("" if epochs >= e_star else " - fewer than the target: the budget allows no more")))
    D.append(Decision(setting="train.ensemble", value=k,
                      reason=f"each member needs ~{format_seconds(epochs * ep_s)}; {format_seconds(left)} left for "
                             f"fitting and evaluation -> {k} member(s) (seeds {seed}..{seed + k - 1}, soft voting; "
                             f"at most {MAX_MEMBERS}, members only once each has its target epochs)"))
    fit_s = left - post_s(r, k, tta_n)
    max_minutes = round(fit_s / 60, 2)
    D.append(Decision(setting="train.max_minutes", value=max_minutes,
                      reason=f"budget {format_seconds(budget_s)} = planning {planned_at:.0f}s + loading "
                             f"~{1.2 * load_c:.0f}s + evaluation/explanations/report ~{post_s(r, k, tta_n):.0f}s + "
                             f"margin {margin:.0f}s + fitting; planned fitting {k * epochs * ep_s:.0f}s, capped at "
                             f"{fit_s:.0f}s"))
    ema = ema_decay(steps)
    D.append(Decision(setting="train.ema", value=ema,
                      reason=f"{steps} steps per member: weight average with a half-life of ~"
                             f"{math.log(2) / (1 - ema):.0f} steps (a quarter of training) smooths the last epochs"
                             if ema else f"only {steps} steps: too few for a weight average to settle"))
    img = choice
    mix = steps >= 3000
    D.append(Decision(setting="train.mixup", value=0.2 if mix else 0.0,
                      reason="members get >= 3000 steps: mixup 0.2 regularises long training" if mix else
                      f"{steps} steps per member: mixup slows convergence more than it regularises at this length"))
    cut = mix and fp.spatial_dims == 2 and img >= 64
    D.append(Decision(setting="train.cutmix", value=1.0 if cut else 0.0,
                      reason="2D >= 64 px with long training: cutmix 1.0" if cut else
                      (f"{img} px inputs: a pasted patch hides most of a small lesion" if img < 64 else
                       f"{steps} steps per member: too short for cutmix")))
    prog = fp.spatial_dims == 2 and img >= 64 and epochs >= 30
    D.append(Decision(setting="train.progressive", value={"start": 0.5, "fraction": 0.3} if prog else None,
                      reason="large inputs and >= 30 epochs: the first 30% of epochs at reduced size buy speed"
                      if prog else f"{img} px {'volumes' if fp.spatial_dims == 3 else 'images'}, {epochs} epochs: "
                      "downsampled early epochs would save little and lose detail"))
    tta = bool(flips)
    D.append(Decision(setting="evaluation.tta", value=tta,
                      reason=f"averages predictions over the training flips ({', '.join(flips)}): the network was "
                             "taught they do not change the label" if tta else "no flips in training augmentation"))
    thr = "youden"
    D.append(Decision(setting="evaluation.threshold", value=thr,
                      reason="binary: Youden's J on validation balances sensitivity and specificity under "
                             "imbalance" if fp.task == "binary" else
                      f"{fp.task}: decisions are argmax/0.5 (the rule applies to binary tasks only)"))
    # the config
    t = dict(tbase)
    t.update(epochs=epochs, precision=prec, ensemble=k, max_minutes=max_minutes, ema=ema,
             mixup=0.2 if mix else 0.0, cutmix=1.0 if cut else 0.0,
             progressive={"start": 0.5, "fraction": 0.3} if prog else None, warmup_epochs=0)
    d = cfg0.model_dump(mode="json")
    d["seed"] = seed
    d["data"] = dc_c.model_dump(mode="json")
    d["model"] = {**d.get("model", {}), "name": base["model"], "params": base["params"]}
    d["train"] = {**d.get("train", {}), **t}
    d["evaluation"] = {**d.get("evaluation", {}), "tta": tta, "threshold": thr}
    est = {"planning_s": round(time.monotonic() - t0, 1), "load_s": round(load_c, 1),
           "epoch_s": round(ep_s, 2), "member_fit_s": round(epochs * ep_s, 1),
           "fit_s": round(k * epochs * ep_s, 1), "post_s": round(post_s(r, k, tta_n), 1),
           "margin_s": round(margin, 1),
           "total_s": round(planned_at + 1.2 * load_c + k * epochs * ep_s + post_s(r, k, tta_n), 1)}
    plan = Plan(budget=str(budget), budget_seconds=budget_s, seed=seed, input=str(source), fingerprint=fp,
                speeds=[v.summary() for v in ([*speeds.values()] + [res[s][0] for s in sorted(res) if s != native]
                                              + [cal])],
                estimates=est, decisions=D)
    d["plan"] = plan.model_dump(mode="json")
    for ov in overrides or []:
        apply_override(d, ov)
    return config_from_dict(d, str(source))


def write_plan(cfg: ExperimentConfig, out: str | Path) -> Path:
    from medlens.config import dump_config
    from medlens.utils import write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# medlens plan: an experiment config (`medlens train` trains it); `plan:` records why each setting\n"
              "# was chosen (docs/auto.md).\n")
    write_text_atomic(out, header + dump_config(cfg))
    return out
