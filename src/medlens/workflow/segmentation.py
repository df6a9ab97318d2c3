"""Training a segmentation run (``task: segmentation``): cases -> run contract -> fit (engine) -> threshold on
validation (two classes) -> evaluation (Dice, surface distances) -> report. ``medlens segment`` (new files with
a trained run) is ``workflow.segment``. The folder's start and finish are the run life-cycle's."""

from __future__ import annotations

from pathlib import Path

import torch

from medlens.data.segmentation import channel_stats
from medlens.data.splits import PER_IMAGE
from medlens.engine.train import build_network, fit_segmentation
from medlens.errors import ConfigError, MedlensError
from medlens.evaluation.segmentation import evaluate_segmentation_run
from medlens.evaluation.threshold import choose_dice_threshold
from medlens.models import get_model_entry
from medlens.models.transfer import apply_transfer
from medlens.run import InputPrep, Predictor, Run, RunMeta, Threshold
from medlens.run.profile import profile_of_cases
from medlens.tasks import TaskType
from medlens.transforms.preprocess import prepared_segmentation
from medlens.workflow.lifecycle import Progress, finish, loading, write_start


def train_segmentation(cfg, path: Path, resume: bool, callbacks, progress_bar: bool, log=None,
                       progress: Progress | None = None) -> Run:
    """Fit and finish one segmentation run in ``path`` (held by ``lifecycle.RunStart``). ``progress``: the
    loading of the cases (``lifecycle.loading``)."""
    seg = cfg.segmentation
    if get_model_entry(cfg.model.name).task != "segmentation":
        raise ConfigError(f"model '{cfg.model.name}' is a classifier; a segmentation run needs unet or basic_unet")
    if cfg.train.monitor not in ("val_auc", "val_dice"):  # val_auc: the default, left unset
        raise ConfigError(f"train.monitor '{cfg.train.monitor}': segmentation runs monitor val_dice")
    with loading(progress) as report:
        data = prepared_segmentation(cfg.data, seg, seed=cfg.seed, progress=report)
    if not data.train or not data.val or not data.test:
        raise MedlensError(f"empty split: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    if not data.patients_known and log is not None:
        log(f"warning: {PER_IMAGE}; name the patients (data.patient_pattern, a CSV patient column, or DICOM files "
            "with PatientID) for a patient-level split")
    first = data.train[0]
    n_cls = len(data.class_names)
    c = first.channels
    if cfg.data.normalize == "dataset":  # stored volumes: slab by slab, never the whole training set at once
        mean, std = channel_stats(data.train)
    else:
        mean, std = [0.0] * c, [1.0] * c
    meta = RunMeta(
        task=TaskType.SEGMENTATION, model=cfg.model.name, model_params=cfg.model.params, in_channels=c,
        n_outputs=1 if n_cls == 2 else n_cls, input_size=list(seg.patch_size), class_names=data.class_names,
        label_values=seg.label_values,
        preprocessing=InputPrep(spatial_dims=first.dims, color=cfg.data.color, clahe=cfg.data.clahe,
                                window=cfg.data.window, intensity=cfg.data.intensity, mean=mean, std=std,
                                pixel_spacing=cfg.data.pixel_spacing),
        split_method=data.split_method, dataset=cfg.data.path, patients_known=data.patients_known,
        n_samples={s: len(data.get(s)) for s in ("train", "val", "test")},
        patients={s: sorted({k.patient_id for k in data.get(s)}) for s in ("train", "val", "test")})
    # issue 26: segmenters record the training inputs' profile too; segment, serve and --push check inputs on it
    meta.input_profile = profile_of_cases(data.train, cfg.data.modality)
    write_start(cfg, meta, path)
    torch.manual_seed(cfg.seed)
    net = build_network(meta.model, c, meta.n_outputs, meta.spatial_dims, meta.input_size, meta.model_params,
                        mean, std)
    if cfg.model.pretrained or cfg.model.freeze:
        meta.transfer = apply_transfer(net.net, cfg.model.pretrained, cfg.model.freeze)
    net, fit = fit_segmentation(cfg, data, net, meta.n_outputs, path, resume, callbacks, progress_bar)
    meta = meta.model_copy(update=fit.summary())
    run = Run(path, meta, cfg).use_model(net)
    predictor = Predictor(run)
    if n_cls == 2:
        rule = seg.threshold
        if rule.startswith("fixed:"):
            run.meta.threshold = Threshold(rule=rule, value=float(rule.split(":", 1)[1]))
        else:
            probs = [predictor.segment_probs(k.image, k.case_id)[1] for k in data.val]
            value, score = choose_dice_threshold(probs, [k.mask > 0 for k in data.val])
            run.meta.threshold = Threshold(rule="val (best mean Dice)", value=value, val_score=score)
    finish(run, lambda r: evaluate_segmentation_run(r, data=data, predictor=predictor))
    return run
