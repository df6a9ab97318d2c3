"""Self-configuring classification (issue 17): fingerprint a dataset, measure this machine, write a plan.

``make_plan(source, budget)`` reads a dataset (a MedMNIST-format ``.npz``, a catalogue entry ``name`` or
``name@size``, an image folder, a CSV manifest, an HDF5 patch store, or an experiment YAML whose ``data:``
section is used), fingerprints it (``medlens.data.fingerprint``), times real training steps of the candidate
networks, resolutions and precisions on real batches (``medlens.engine.probe``) and returns an ordinary
``ExperimentConfig`` whose ``plan:`` section records the budget, the fingerprint, the measured speeds and every
decision with its reason. The rules read only the fingerprint and the measured speed: no dataset is known by name.

The budget covers the whole of ``medlens train --auto``: planning (its probes), loading the data for training,
fitting (all ensemble members), and evaluation, explanations and the report, with a safety margin.
On small datasets the plan cross-validates (``train.cv_folds``; issue 30): train and validation pooled and dealt
into k folds by patient, the k fold models the ensemble, calibration and threshold chosen on their out-of-fold
predictions (``workflow.ensemble.fit_cv``). Planning reads the test split's size and class counts (the
fingerprint) and never its images.
``train.max_minutes`` caps fitting at its share, so a slower-than-measured machine still finishes in time.

The rules are ``engine.planner.Planner`` (one ``determine_*`` method per decision); this module orchestrates:
it reads the source, loads the data, runs the probes and assembles the config.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, cast

from medlens.config import (
    DataConfig,
    ExperimentConfig,
    TrainConfig,
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
)
from medlens.data.catalog import MEDMNIST
from medlens.data.fingerprint import Fingerprint, fingerprint
from medlens.data.sources import get_source, list_sources, source_for_path
from medlens.data.splits import Sealed
from medlens.engine.planner import (
    CV_FOLDS,
    CV_MAX_POOLED,
    MAX_MEMBERS,
    PLANNER_VERSION,
    SAFETY,
    SIGNAL_FOLDS,
    SIGNAL_MAX_HELD,
    SIGNAL_MIN_BUDGET_S,
    SIGNAL_SHARE,
    TARGET_STEPS,
    Decision,
    Plan,
    Planner,
    ema_decay,
    format_seconds,
    parse_budget,
    target_epochs,
)
from medlens.engine.probe import CAL_EPOCHS, MachineFigures, ProbeResult, SignalResult, calibrate, probe, signal
from medlens.errors import ConfigError, DataError
from medlens.transforms.preprocess import prepared_data
from medlens.utils import write_text_atomic
from medlens.workflow.seg_plan import is_segmentation_input, make_seg_plan

__all__ = ["MAX_MEMBERS", "PLANNER_VERSION", "SAFETY", "TARGET_STEPS", "Decision", "Plan", "Planner", "base_config",
           "base_decisions", "ema_decay", "format_seconds", "load_for_plan", "make_plan", "parse_budget",
           "target_epochs", "write_plan"]


# ---------------------------------------------------------------- input
def base_config(source: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment the plan starts from: a YAML's own, or a fresh one around the data ``source`` names."""
    text = str(source)
    p = Path(text)
    if p.suffix.lower() in (".yaml", ".yml"):
        return load_config(p, [o for o in overrides or [] if o.startswith("data.")])
    if p.exists():
        entry = source_for_path(p)
        if entry is None:
            kinds = sorted({x for e in list_sources() for x in e.plan_suffixes})
            folder = ", an image folder" if any(e.plan_folder for e in list_sources()) else ""
            raise DataError(f"not a dataset the planner reads (a {', '.join(kinds)} file{folder} or an experiment "
                            ".yaml)", p)
        data = entry.plan_section(text)
        stem = p.name if p.is_dir() else p.stem
    else:
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
    """The file holding the source's prepared arrays (fingerprinted), if the source has one."""
    return get_source(dc.source).stored_file(dc)


def _resized(dc: DataConfig, size: int, files: dict[int, str]) -> DataConfig:
    """The same data at another on-disk resolution."""
    if dc.path:
        return dc.model_copy(update={"path": str(PurePosixPath(dc.path).with_name(Path(files[size]).name)),
                                     "size": size})
    return dc.model_copy(update={"size": size})


def load_for_plan(dc: DataConfig, seed: int):
    """Prepared splits as training will see them; a 3-channel MedMNIST-format file is read in colour."""
    dc = get_source(dc.source).for_plan(dc)
    return dc, prepared_data(dc, seed=seed)


# ---------------------------------------------------------------- rules
def base_decisions(fp: Fingerprint) -> tuple[dict, list[Decision]]:
    """Settings that follow from the fingerprint alone (the budget decides the rest)."""
    return Planner(fp).plan_from_fingerprint()


# ---------------------------------------------------------------- planning
class _PlanningClock:
    """The planning time the budget's rules see: the sum of this machine's stored figures (loading,
    fingerprint, each probe's cost), not the wall clock, so a busy moment does not change the plan."""

    def __init__(self) -> None:
        self.spent = 0.0

    def add(self, seconds: float) -> None:
        self.spent += seconds

    def __call__(self) -> float:
        return self.spent


def _probe_key(kind: str, ds, model: str, params: dict, tc: TrainConfig, max_seconds: float, seed: int) -> dict:
    """What a probe's figure depends on (besides the machine): the workload, not the pixels."""
    return {"probe": kind, "model": model, "params": params, "train": tc.model_dump(mode="json"),
            "shape": list(ds.train.image_shape), "channels": ds.train.in_channels, "outputs": ds.train.n_outputs,
            "task": ds.train.task, "n": [len(ds.train), len(ds.val)], "max_seconds": round(max_seconds, 2),
            "seed": seed}


def _choose_architecture(planner: Planner, data, budget: str, budget_s: float, prec: str, tbase: dict,
                         load_s: float, seed: int, figs: MachineFigures, clock: _PlanningClock,
                         trial: Callable[..., ProbeResult], log: Callable[[str], None]) -> list[SignalResult]:
    """Architecture by measurement (issue 30 item 2): each candidate's speed probe, the short cross-validated
    signal runs of those the budget can train (``Planner.signal_steps``), then ``Planner.choose_model``. On volumes
    or a budget below ``SIGNAL_MIN_BUDGET_S`` the rule's model stays and its reason says why. Returns the signals."""
    cands = planner.model_candidates()
    if not cands:
        planner.model_fallback("the measured choice covers 2D candidates; volumes keep the rule's 3D CNN")
        return []
    if budget_s < SIGNAL_MIN_BUDGET_S:
        planner.model_fallback(f"budget {budget} < {format_seconds(SIGNAL_MIN_BUDGET_S)}: the candidates' probes "
                               f"and signal runs (about {SIGNAL_SHARE:.0%} of the budget) do not fit, so the rule "
                               "decides")
        return []
    probes = {label: trial(data, prec, model, params) for label, model, params in cands}
    steps = planner.signal_steps(cands, probes, load_s)
    tc = TrainConfig(**{**tbase, "epochs": 2, "precision": prec})
    signals: dict[str, SignalResult] = {}
    for label, model, params in cands:
        if not steps[label]:
            continue
        key = {"signal": model, "params": params, "train": tc.model_dump(mode="json"),
               "shape": list(data.train.image_shape), "channels": data.train.in_channels,
               "outputs": data.train.n_outputs, "task": data.train.task, "n": [len(data.train), len(data.val)],
               "steps": steps[label], "folds": SIGNAL_FOLDS, "max_held": SIGNAL_MAX_HELD, "seed": seed}
        s, cached = figs.signal(key, lambda m=model, p=params, n=steps[label]: signal(
            tc, data, m, p, steps=n, folds=SIGNAL_FOLDS, max_held=SIGNAL_MAX_HELD, seed=seed))
        clock.add(s.seconds)
        signals[label] = s
        log(f"signal {label}: AUC {s.auc:.3f} on {s.n_held} held-out cases after {s.steps} steps ({s.seconds:.1f} s)"
            + (" (this machine's stored figure)" if cached else ""))
    planner.choose_model(cands, probes, signals, load_s)
    return list(signals.values())


def make_plan(source: str | Path, budget: str, *, seed: int = 0, overrides: list[str] | None = None,
              log: Callable[[str], None] = lambda s: None, started: float | None = None,
              recalibrate: bool = False) -> ExperimentConfig:
    """The planned experiment config (``plan:`` filled). ``started``: when the budget's clock started
    (``time.monotonic()``; default now). The measured figures are this machine's stored ones where the same
    workload was measured before (``MachineFigures``); ``recalibrate`` measures them again."""
    t0 = started if started is not None else time.monotonic()
    budget_s = parse_budget(budget)
    if is_segmentation_input(source, overrides):   # image/mask pairs: the segmentation planner (issue 30 item 6)
        return make_seg_plan(source, budget, seed=seed, overrides=overrides, log=log, started=started,
                             recalibrate=recalibrate)
    cfg0 = base_config(source, overrides)
    if cfg0.task != "classification":
        raise ConfigError(f"the planner plans classifiers; this config's task is '{cfg0.task}'", str(source))
    figs = MachineFigures(recalibrate=recalibrate, log=log)
    clock = _PlanningClock()
    if started is not None:   # train --auto: loading the training chain before planning is part of the budget
        clock.add(figs.seconds({"before planning": "train --auto"}, time.monotonic() - t0))
    tl = time.monotonic()
    dc, data = load_for_plan(cfg0.data, seed)
    data = replace(data, test=cast(Any, Sealed(data.test, "planning")))   # size and class counts only (issue 30)
    load_s = figs.seconds({"load": dc.model_dump(mode="json")}, time.monotonic() - tl)
    tf = time.monotonic()
    fp = fingerprint(data, dc.source, str(source), _npz_path(dc), seed=seed)
    clock.add(load_s + figs.seconds({"fingerprint": dc.model_dump(mode="json"), "seed": seed},
                                    time.monotonic() - tf))
    planner = Planner(fp, budget_s, seed=seed, started=0.0, clock=clock, explain=cfg0.explain)
    base, _ = planner.plan_from_fingerprint()
    tbase = dict(base["train"])
    per_probe = float(min(8.0, max(2.0, 0.015 * budget_s)))

    seen: dict[str, ProbeResult] = {}   # each probe's cost counts once, however often the plan asks for it

    def measured(kind: str, ds, tc: TrainConfig, max_seconds: float, model: str | None = None,
                 params: dict | None = None) -> tuple[ProbeResult, str | None]:
        model, params = model or planner.model, planner.params if params is None else params
        key = _probe_key(kind, ds, model, params, tc, max_seconds, seed)
        k = json.dumps(key, sort_keys=True)
        if k in seen:
            return seen[k], None
        if kind == "steps":
            def measure() -> ProbeResult:
                return probe(tc, ds, model, params, max_seconds=max_seconds, seed=seed)
        else:   # whole epochs of real training on what one member trains on (a fold model's data under CV)
            key.update(epochs=CAL_EPOCHS, folds=cal_folds)

            def measure() -> ProbeResult:
                return calibrate(tc, ds, model, params, folds=cal_folds, max_seconds=max_seconds, seed=seed)
        r, cached = figs.probe(key, measure)
        clock.add(r.seconds)
        seen[k] = r
        return r, " (this machine's stored figure)" if cached else ""

    def trial(ds, precision: str, model: str | None = None, params: dict | None = None):
        tc = TrainConfig(**{**tbase, "epochs": 2, "precision": precision})
        r, note = measured("steps", ds, tc, per_probe, model, params)
        if note is None:    # asked again: measured and logged once
            return r
        log(f"probe {r.model} {'x'.join(map(str, r.size))} {precision}: {r.train_img_per_s:.1f} img/s "
            f"training, {r.val_img_per_s:.0f} img/s inference ({r.seconds:.1f} s){note}")
        return r

    speeds = {"bf16-mixed": trial(data, "bf16-mixed"), "32": trial(data, "32")}
    prec = planner.determine_precision(speeds)
    signals = _choose_architecture(planner, data, budget, budget_s, prec, tbase, load_s, seed, figs, clock, trial,
                                   log)
    native = fp.image_shape[0]
    res = {native: (trial(data, prec), load_s)}
    configs = {native: (data, dc)}
    for size in fp.resolutions_on_disk:
        if native < size <= 4 * native and fp.spatial_dims in (2, 3):
            dcs = _resized(dc, size, fp.resolution_files)
            tl = time.monotonic()
            dcl, ds = load_for_plan(dcs, seed)
            ds = replace(ds, test=cast(Any, Sealed(ds.test, "planning")))
            ls_ = figs.seconds({"load": dcl.model_dump(mode="json")}, time.monotonic() - tl)
            clock.add(ls_)
            if ds.train.image_shape[0] != size:
                continue
            res[size] = (trial(ds, prec), ls_)
            configs[size] = (ds, dcs)
            del ds

    # the calibration trains what one member will: a fold model of five where train+val is small enough for
    # cross-validation (determine_validation), else on the training split
    cal_folds = CV_FOLDS[0] if fp.n["train"] + fp.n["val"] < CV_MAX_POOLED else 0

    def calibration(size: int):
        tc = TrainConfig(**{**tbase, "epochs": 2, "precision": prec})
        cal, note = measured("epoch", configs[size][0], tc, max(per_probe, 0.05 * budget_s))
        log(f"calibration at {size} px, {CAL_EPOCHS} epochs: " + (
            f"{cal.epoch_seconds:.2f} s per epoch + {cal.fixed_seconds:.1f} s per fit" if cal.epoch_seconds else
            f"stopped after {cal.seconds:.0f} s; {cal.train_img_per_s:.1f} img/s") + (note or ""))
        return cal

    choice, r = planner.determine_resolution(res, calibration)
    dc_c, load_c = configs[choice][1], res[choice][1]
    folds = planner.determine_validation(r, load_c)
    epochs = planner.determine_epochs(r, load_c, str(budget))
    k = planner.determine_ensemble(r, load_c)
    max_minutes = planner.determine_max_minutes(r, load_c)
    ema = planner.determine_ema()
    mixup = planner.determine_mixup()
    cutmix = planner.determine_cutmix()
    progressive = planner.determine_progressive()
    tta = planner.determine_tta()
    thr = planner.determine_threshold()
    explain = planner.determine_explanations(r)
    # the config
    t = dict(tbase)
    t.update(epochs=epochs, precision=prec, ensemble=k, cv_folds=folds, max_minutes=max_minutes, ema=ema, mixup=mixup,
             cutmix=cutmix, progressive=progressive, warmup_epochs=0)
    d = cfg0.model_dump(mode="json")
    d["seed"] = seed
    d["data"] = dc_c.model_dump(mode="json")
    d["model"] = {**d.get("model", {}), "name": planner.model, "params": planner.params}
    d["train"] = {**d.get("train", {}), **t}
    d["evaluation"] = {**d.get("evaluation", {}), "tta": tta, "threshold": thr}
    d["explain"] = {**d.get("explain", {}), **explain}
    log(f"planning took {time.monotonic() - t0:.0f} s; budgeted {clock():.0f} s from this machine's figures "
        f"({figs.reused} stored, {figs.measured} measured now; {figs.path})")
    plan = Plan(budget=str(budget), budget_seconds=budget_s, seed=seed, input=str(source), fingerprint=fp,
                machine={**figs.machine, "figures": "measured once per workload on this machine and reused "
                                                    "(speeds, estimates.load_s; docs/auto.md)"},
                speeds=[v.summary() for v in seen.values()], signals=[v.summary() for v in signals],
                estimates=planner.estimates(r, load_c), decisions=planner.decisions)
    d["plan"] = plan.model_dump(mode="json")
    for ov in overrides or []:
        apply_override(d, ov)
    return config_from_dict(d, str(source))


def write_plan(cfg: ExperimentConfig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# medlens plan: an experiment config (`medlens train` trains it); `plan:` records why each setting\n"
              "# was chosen (docs/auto.md).\n")
    write_text_atomic(out, header + dump_config(cfg))
    return out
