"""Training a classifier (``task`` binary, multiclass, ordinal, multilabel; a classical model or a network, one
or an ensemble): data -> run contract -> fit (engine) -> calibration and threshold on validation -> evaluation
-> explanations -> report. ``medlens federate`` ends its global model through ``finish_classifier`` too.
The folder's start and finish are the run life-cycle's (``workflow.lifecycle``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medlens.data.labels import positive_question
from medlens.data.splits import PER_IMAGE
from medlens.engine.classical import CLASSICAL_MODELS
from medlens.engine.train import (
    build_network,
    channel_stats,
    fit_classical_model,
    fit_classifier,
)
from medlens.errors import ConfigError, MedlensError
from medlens.evaluation.calibration import calibration_method, select_calibration
from medlens.evaluation.evaluate import evaluate_run
from medlens.evaluation.intervals import conformal_interval
from medlens.evaluation.threshold import choose_label_thresholds, choose_threshold
from medlens.explain.run import write_report_section
from medlens.models.transfer import apply_transfer
from medlens.run import InputPrep, Predictor, Run, RunMeta, Threshold
from medlens.run.profile import profile_of
from medlens.tasks import get_task
from medlens.transforms.preprocess import prepared_data
from medlens.workflow.ensemble import fit_cv, fit_ensemble
from medlens.workflow.lifecycle import Progress, finish, loading, write_start


def classifier_meta(cfg, data, classical: bool = False) -> RunMeta:
    """The run contract of a classifier about to be fitted on ``data`` (normalisation from its training split)."""
    tr = data.train
    c = tr.in_channels
    mean, std = (channel_stats(tr) if cfg.data.normalize == "dataset" and not classical
                 else ([0.0] * c, [1.0] * c))
    meta = RunMeta(
        kind="classical" if classical else "torch", task=data.task, model=cfg.model.name,
        model_params=cfg.model.params, in_channels=c, n_outputs=tr.n_outputs, input_size=list(tr.image_shape),
        class_names=data.class_names,
        preprocessing=InputPrep(spatial_dims=tr.spatial_dims, size=list(tr.image_shape), color=cfg.data.color,
                                clahe=cfg.data.clahe, mean=mean, std=std,
                                # a patch store windows its HU patches itself (lung): predict must window too
                                window=getattr(tr, "window", None) or cfg.data.window),
        split_method=data.split_method, dataset=cfg.data.name or cfg.data.path,
        patients_known=getattr(data, "patients_known", None),
        positive_class=data.class_names[1] if get_task(data.task).has_threshold and get_task(data.task).exclusive
        else None,
        n_samples={s: len(data.get(s)) for s in ("train", "val", "test")},
        class_counts={s: data.get(s).class_counts().tolist() for s in ("train", "val", "test")})
    if get_task(data.task).numeric:  # issue 26: the network learns the target standardised by its training values
        y = np.asarray(tr.labels, np.float64)
        meta.target_scale = [float(y.mean()), float(max(y.std(), 1e-6))]
    return meta


def train_classifier(cfg, path: Path, resume: bool, callbacks, progress_bar: bool, log,
                     writer: bool = True, progress: Progress | None = None) -> Run | None:
    """Fit and finish one classifier run in ``path`` (held by ``lifecycle.RunStart``); with ``writer`` False
    (a data-parallel process other than global rank 0) fit only and write nothing. ``progress``: the loading
    (``lifecycle.loading``)."""
    with loading(progress) as report:
        data = prepared_data(cfg.data, seed=cfg.seed, progress=report)
    tr = data.train
    if len(tr) == 0 or len(data.val) == 0 or len(data.test) == 0:
        raise MedlensError(f"empty split: train {len(tr)}, val {len(data.val)}, test {len(data.test)}")
    if data.needs_positive:  # two classes named by files, neither (or both) a conventional negative
        raise ConfigError(positive_question(data.class_names))
    if data.patients_known is False:
        log(f"warning: {PER_IMAGE}; name the patients (a CSV patient column, data.patient_pattern, or DICOM files "
            "with PatientID) for a patient-level split")
    calibration_method(data.task, cfg.evaluation.calibration)  # a setting that does not fit the task fails now
    classical = cfg.model.name in CLASSICAL_MODELS
    if classical and get_task(data.task).numeric:
        raise ConfigError(f"model '{cfg.model.name}' is a classical classifier; a {data.task} trains a network")
    meta = classifier_meta(cfg, data, classical)
    c, mean, std = tr.in_channels, meta.preprocessing.mean, meta.preprocessing.std
    if writer:  # global rank 0 (issue 15: the other data-parallel processes only fit)
        # issue 19: the training inputs' profile, against which predict and serve check each input
        meta.input_profile = profile_of(data, cfg.data)
        write_start(cfg, meta, path)
    oof = None   # out-of-fold (labels, probabilities) of train+val under train.cv_folds
    if classical:
        model, n_features, fit = fit_classical_model(cfg, data, path)
        meta.n_features = n_features
    else:
        def network(seed: int):
            torch.manual_seed(seed)
            net = build_network(cfg.model.name, c, meta.n_outputs, tr.spatial_dims, meta.input_size,
                                cfg.model.params, mean, std, meta.target_scale)
            if cfg.model.pretrained or cfg.model.freeze:
                meta.transfer = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
                log(f"transfer: loaded {meta.transfer['loaded']} tensors, skipped "
                    f"{len(meta.transfer['skipped'])}, frozen {meta.transfer['frozen']} parameters")
            return net

        limit = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
        if cfg.train.ensemble > 1 or cfg.train.cv_folds:  # issue 30: the k fold models of train.cv_folds
            model, fit, members, oof = (fit_cv if cfg.train.cv_folds else fit_ensemble)(
                cfg, data, network, path, resume, callbacks, progress_bar, limit, log)
            meta.model = "ensemble"
            meta.model_params = {"member": cfg.model.name, "member_params": cfg.model.params,
                                 "k": len(members), "combine": model.net.combine}
            meta.members = members
        else:
            model, fit = fit_classifier(cfg, data, network(cfg.seed), path, resume, callbacks, progress_bar, limit)
    if not writer:
        return None
    return finish_classifier(cfg, meta.model_copy(update=fit.summary()), path, data, model, classical, oof=oof)


def finish_classifier(cfg, meta: RunMeta, path: Path, data, model, classical: bool = False, *,
                      status: Literal["complete", "failed"] = "complete", after: Callable[[Run, Predictor], None] | None = None,
                      oof: tuple[np.ndarray, np.ndarray] | None = None) -> Run:
    """A fitted classifier -> calibration and threshold on validation -> (life-cycle finish: ``status``) ->
    evaluation -> explanations -> ``after`` (more report sections) -> report (``medlens train``, and
    ``medlens federate`` with the global model). ``oof``: the out-of-fold (labels, uncalibrated probabilities) of
    a cross-validated run, on which calibration and threshold are chosen instead of the validation split."""
    run = Run(path, meta, cfg).use_model(model)
    predictor = Predictor(run)
    # calibration first, then the threshold on the calibrated validation probabilities: both from validation only
    y_val, raw_val = oof if oof is not None else (data.val.labels,
                                                  predictor.predict_dataset(data.val, calibrated=False))
    # chosen by cross-validation inside validation: none unless a scaling lowers the held-out log-loss
    run.meta.calibration, run.meta.calibration_choice = select_calibration(
        meta.task, y_val, raw_val, cfg.evaluation.calibration, seed=cfg.seed)
    if get_task(meta.task).has_threshold:
        rule = cfg.evaluation.threshold
        p_val = run.meta.calibration.apply(raw_val) if run.meta.calibration else raw_val
        run.meta.threshold = Threshold(rule=rule, value=choose_threshold(y_val, p_val, rule))
    task = get_task(meta.task)
    if task.label_thresholds:  # issue 26: each label's own threshold by evaluation.threshold on validation
        run.meta.label_thresholds = choose_label_thresholds(y_val, raw_val, run.meta.class_names,
                                                            cfg.evaluation.threshold)
    if task.numeric:  # issue 26: a split-conformal prediction interval from the validation residuals
        run.meta.interval = conformal_interval(y_val, raw_val, cfg.evaluation.interval)

    def evaluate(r: Run) -> None:
        evaluate_run(r, data=data, predictor=predictor)
        if not classical:
            # explain.method, or the method most faithful on a few validation images (issue 26)
            write_report_section(r, cfg.explain.method, predictor=predictor, test=data.test, val=data.val)
        if after is not None:
            after(r, predictor)

    finish(run, evaluate, status)
    return run
