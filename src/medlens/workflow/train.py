"""``medlens train``: config -> data -> fit (engine) -> run contract -> threshold on validation ->
evaluation -> explanations -> report. The engine fits and returns; this module chains the rest.

A run is a folder ``<output_dir>/<name>/`` holding ``.medlens-run`` (the marker), ``config.yaml``,
``run.json`` (``RunMeta``), the weights (``model.pt``, or ``model.skops``), ``checkpoints/`` (resume),
``history.csv``, ``metrics.json``, ``predictions.csv``, ``plots/`` and ``report.html``. A lock file keeps a
second writer out while it trains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from medlens.config import ExperimentConfig, dump_config
from medlens.errors import ConfigError, MedlensError, MedlensWarning
from medlens.run import InputPrep, Predictor, Run, RunFolder, RunMeta, Threshold, run_lock
from medlens.tasks import TaskType
from medlens.utils import seed_everything, write_text_atomic


def resolve_run_dir(cfg: ExperimentConfig, run_dir: str | Path | None) -> Path:
    return Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name


def train(cfg: ExperimentConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, callbacks: list | None = None, progress_bar: bool = True,
          log: Callable[[str], None] = print) -> Path:
    """Train, evaluate, explain and report one experiment; return its run folder."""
    from medlens.engine.distributed import plan

    path = resolve_run_dir(cfg, run_dir)
    if plan(cfg.train).rank != 0:  # a data-parallel process started by torchrun/srun: fit, write nothing
        seed_everything(cfg.seed)
        _train_classifier(cfg, path, resume, callbacks, False, log, writer=False)
        return path
    folder = RunFolder(path)
    folder.check(resume, overwrite)
    with run_lock(path):
        from_ckpt = folder.prepare(resume, overwrite)
        if resume and not from_ckpt:
            import warnings

            warnings.warn("the run was stopped before its first checkpoint: training starts again from epoch 0",
                          MedlensWarning, stacklevel=2)
        seed_everything(cfg.seed)
        torch.set_num_threads(cfg.train.num_threads or os.cpu_count() or 1)
        if cfg.task == "segmentation":
            run = _train_segmentation(cfg, path, from_ckpt, callbacks, progress_bar)
        elif cfg.task == "anomaly":  # issue 18: autoencoder on the normal class (workflow.anomaly)
            from medlens.workflow.anomaly import train_anomaly

            run = train_anomaly(cfg, path, from_ckpt, callbacks, progress_bar, log)
        else:
            run = _train_classifier(cfg, path, from_ckpt, callbacks, progress_bar, log)
    return run.dir


def _write_start(cfg: ExperimentConfig, meta: RunMeta, path: Path) -> None:
    write_text_atomic(path / "config.yaml", dump_config(cfg))
    meta.save(path)


def classifier_meta(cfg, data, classical: bool = False) -> RunMeta:
    """The run contract of a classifier about to be fitted on ``data`` (normalisation from its training split)."""
    from medlens.engine.train import channel_stats

    tr = data.train
    c = tr.in_channels
    mean, std = (channel_stats(tr) if cfg.data.normalize == "dataset" and not classical
                 else ([0.0] * c, [1.0] * c))
    meta = RunMeta(
        kind="classical" if classical else "torch", task=TaskType(data.task), model=cfg.model.name,
        model_params=cfg.model.params, in_channels=c, n_outputs=tr.n_outputs, input_size=list(tr.image_shape),
        class_names=data.class_names,
        preprocessing=InputPrep(spatial_dims=tr.spatial_dims, size=list(tr.image_shape), color=cfg.data.color,
                                clahe=cfg.data.clahe, mean=mean, std=std,
                                # a patch store windows its HU patches itself (lung): predict must window too
                                window=getattr(tr, "window", None) or cfg.data.window),
        split_method=data.split_method, dataset=cfg.data.name or cfg.data.path,
        n_samples={s: len(data.get(s)) for s in ("train", "val", "test")},
        class_counts={s: data.get(s).class_counts().tolist() for s in ("train", "val", "test")})
    return meta


def _train_classifier(cfg, path: Path, resume: bool, callbacks, progress_bar: bool, log,
                      writer: bool = True) -> Run | None:
    from medlens.transforms.preprocess import prepared_data
    from medlens.engine.classical import CLASSICAL_MODELS
    from medlens.engine.train import build_network, fit_classical_model, fit_classifier
    from medlens.evaluation.calibration import calibration_method

    data = prepared_data(cfg.data, seed=cfg.seed)
    tr = data.train
    if len(tr) == 0 or len(data.val) == 0 or len(data.test) == 0:
        raise MedlensError(f"empty split: train {len(tr)}, val {len(data.val)}, test {len(data.test)}")
    calibration_method(data.task, cfg.evaluation.calibration)  # a setting that does not fit the task fails now
    classical = cfg.model.name in CLASSICAL_MODELS
    meta = classifier_meta(cfg, data, classical)
    c, mean, std = tr.in_channels, meta.preprocessing.mean, meta.preprocessing.std
    # issue 19: the training inputs' profile, against which predict and serve check each input
    from medlens.run.profile import profile_of

    if writer:  # global rank 0 (issue 15: the other data-parallel processes only fit)
        meta.input_profile = profile_of(data, cfg.data)
        _write_start(cfg, meta, path)
    if classical:
        model, n_features, fit = fit_classical_model(cfg, data, path)
        meta.n_features = n_features
    else:
        def network(seed: int):
            torch.manual_seed(seed)
            net = build_network(cfg.model.name, c, meta.n_outputs, tr.spatial_dims, meta.input_size,
                                cfg.model.params, mean, std)
            if cfg.model.pretrained or cfg.model.freeze:
                from medlens.models.transfer import apply_transfer

                meta.transfer = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
                log(f"transfer: loaded {meta.transfer['loaded']} tensors, skipped "
                    f"{len(meta.transfer['skipped'])}, frozen {meta.transfer['frozen']} parameters")
            return net

        limit = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
        if cfg.train.ensemble > 1:
            model, fit, members = _fit_ensemble(cfg, data, network, path, resume, callbacks, progress_bar, limit,
                                                log)
            meta.model = "ensemble"
            meta.model_params = {"member": cfg.model.name, "member_params": cfg.model.params,
                                 "k": cfg.train.ensemble, "combine": model.net.combine}
            meta.members = members
        else:
            model, fit = fit_classifier(cfg, data, network(cfg.seed), path, resume, callbacks, progress_bar, limit)
    if not writer:
        return None
    return finish_classifier(cfg, meta.model_copy(update=fit.summary()), path, data, model, classical)


def _fit_ensemble(cfg, data, network, path: Path, resume: bool, callbacks, progress_bar: bool,
                  limit: float | None, log):
    """``train.ensemble``: fit k members with seeds ``seed .. seed+k-1``, each in ``members/<i>/`` (its own
    checkpoints, history and weights; a finished member is kept on ``--resume``), sharing the time limit
    (each member gets an equal share of what is left), then put them behind one soft-voting module."""
    import json
    import time

    import pandas as pd

    from medlens.engine.distributed import plan
    from medlens.engine.module import ClassifierNet
    from medlens.engine.train import FitResult, fit_classifier
    from medlens.models.ensemble import SoftVote
    from medlens.utils import atomic_path, write_json_atomic

    if plan(cfg.train).distributed:
        raise ConfigError("train.ensemble trains its members one after another in one process; use "
                          "train.devices: 1 with it")
    k, t0 = cfg.train.ensemble, time.time()
    nets, members, histories = [], [], []
    for i in range(k):
        mdir = path / "members" / str(i)
        mdir.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model_copy(update={"seed": cfg.seed + i})
        done = mdir / "member.json"
        net = network(mcfg.seed)
        if resume and done.exists() and (mdir / "model.pt").exists():
            net.load_state_dict(torch.load(mdir / "model.pt", map_location="cpu", weights_only=True))
            info = json.loads(done.read_text(encoding="utf-8"))
            log(f"ensemble member {i + 1}/{k} (seed {mcfg.seed}) already trained")
        else:
            share = None if limit is None else max(1.0, (limit - (time.time() - t0)) / (k - i))
            log(f"ensemble member {i + 1}/{k} (seed {mcfg.seed})"
                + (f", up to {share / 60:.1f} min" if share else ""))
            net, fit = fit_classifier(mcfg, data, net, mdir, resume and (mdir / "checkpoints" / "last.ckpt").exists(),
                                      callbacks, progress_bar, share)
            info = {"member": i, "seed": mcfg.seed, "epochs_run": fit.epochs_run,
                    "best_epoch_metric": {fit.monitor: fit.best_score}, "train_seconds": round(fit.seconds, 1),
                    "time_limited": fit.time_limited}
            write_json_atomic(done, info)
        nets.append(net)
        members.append(info)
        if (mdir / "history.csv").exists():
            histories.append(pd.read_csv(mdir / "history.csv").assign(member=i))
    combine = "softmax" if data.task in (TaskType.MULTICLASS, TaskType.ORDINAL) else "sigmoid"
    # one normalisation in front: every member was fitted with the training split's statistics
    model = ClassifierNet(SoftVote([n.net for n in nets], combine), nets[0].normalize.mean,
                          nets[0].normalize.std).eval()
    with atomic_path(path / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    if histories:
        with atomic_path(path / "history.csv") as tmp:
            pd.concat(histories, ignore_index=True).to_csv(tmp, index=False)
    scores = [v for m in members for v in m["best_epoch_metric"].values() if v is not None]
    fit = FitResult(max(scores) if scores else None, max(m["epochs_run"] for m in members), cfg.train.monitor,
                    time.time() - t0, time_limited=any(m["time_limited"] for m in members))
    return model, fit, members


def finish_classifier(cfg, meta: RunMeta, path: Path, data, model, classical: bool = False) -> Run:
    """A fitted classifier -> calibration and threshold on validation -> evaluation -> explanations -> report
    (``medlens train``, and ``medlens federate`` with the global model)."""
    from medlens.evaluation.calibration import fit_calibration
    from medlens.evaluation.evaluate import evaluate_run

    run = Run(path, meta, cfg).use_model(model)
    predictor = Predictor(run)
    # calibration first, then the threshold on the calibrated validation probabilities: both from validation only
    raw_val = predictor.predict_dataset(data.val, calibrated=False)
    run.meta.calibration = fit_calibration(meta.task, data.val.labels, raw_val, cfg.evaluation.calibration)
    if meta.task == TaskType.BINARY:
        from medlens.evaluation.threshold import choose_threshold

        rule = cfg.evaluation.threshold
        p_val = run.meta.calibration.apply(raw_val) if run.meta.calibration else raw_val
        run.meta.threshold = Threshold(rule=rule, value=choose_threshold(data.val.labels, p_val, rule))
    run.meta.status = "complete"
    run.save_meta()
    evaluate_run(run, data=data, predictor=predictor)
    if not classical:
        from medlens.explain.run import write_report_section

        write_report_section(run, "gradcam", predictor=predictor, test=data.test)
    from medlens.report.html import write_report

    write_report(run)
    return run


def _train_segmentation(cfg, path: Path, resume: bool, callbacks, progress_bar: bool) -> Run:
    import numpy as np

    from medlens.transforms.preprocess import prepared_segmentation
    from medlens.engine.train import build_network, fit_segmentation
    from medlens.evaluation.segmentation import evaluate_segmentation_run
    from medlens.models import get_model_entry

    seg = cfg.segmentation
    if get_model_entry(cfg.model.name).task != "segmentation":
        raise ConfigError(f"model '{cfg.model.name}' is a classifier; a segmentation run needs unet or basic_unet")
    if cfg.train.monitor not in ("val_auc", "val_dice"):  # val_auc: the default, left unset
        raise ConfigError(f"train.monitor '{cfg.train.monitor}': segmentation runs monitor val_dice")
    data = prepared_segmentation(cfg.data, seg, seed=cfg.seed)
    if not data.train or not data.val or not data.test:
        raise MedlensError(f"empty split: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    first = data.train[0]
    n_cls = len(data.class_names)
    c = int(first.image.shape[0])
    if cfg.data.normalize == "dataset":
        flat = np.concatenate([k.image.reshape(c, -1) for k in data.train], axis=1)
        mean, std = flat.mean(1).tolist(), flat.std(1).tolist()
        del flat
    else:
        mean, std = [0.0] * c, [1.0] * c
    meta = RunMeta(
        task=TaskType.SEGMENTATION, model=cfg.model.name, model_params=cfg.model.params, in_channels=c,
        n_outputs=1 if n_cls == 2 else n_cls, input_size=list(seg.patch_size), class_names=data.class_names,
        label_values=seg.label_values,
        preprocessing=InputPrep(spatial_dims=first.image.ndim - 1, color=cfg.data.color, clahe=cfg.data.clahe,
                                window=cfg.data.window, intensity=cfg.data.intensity, mean=mean, std=std,
                                pixel_spacing=cfg.data.pixel_spacing),
        split_method=data.split_method, dataset=cfg.data.path,
        n_samples={s: len(data.get(s)) for s in ("train", "val", "test")},
        patients={s: sorted({k.patient_id for k in data.get(s)}) for s in ("train", "val", "test")})
    _write_start(cfg, meta, path)
    torch.manual_seed(cfg.seed)
    net = build_network(meta.model, c, meta.n_outputs, meta.spatial_dims, meta.input_size, meta.model_params,
                        mean, std)
    if cfg.model.pretrained or cfg.model.freeze:
        from medlens.models.transfer import apply_transfer

        meta.transfer = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
    net, fit = fit_segmentation(cfg, data, net, meta.n_outputs, path, resume, callbacks, progress_bar)
    meta = meta.model_copy(update=fit.summary())
    run = Run(path, meta, cfg).use_model(net)
    predictor = Predictor(run)
    if n_cls == 2:
        from medlens.evaluation.threshold import choose_dice_threshold

        rule = seg.threshold
        if rule.startswith("fixed:"):
            run.meta.threshold = Threshold(rule=rule, value=float(rule.split(":", 1)[1]))
        else:
            probs = [predictor.segment_probs(k.image, k.case_id)[1] for k in data.val]
            value, score = choose_dice_threshold(probs, [k.mask > 0 for k in data.val])
            run.meta.threshold = Threshold(rule="val (best mean Dice)", value=value, val_score=score)
    run.meta.status = "complete"
    run.save_meta()
    evaluate_segmentation_run(run, data=data, predictor=predictor)
    from medlens.report.html import write_report

    write_report(run)
    return run
