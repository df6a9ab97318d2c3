"""Experiment configuration: a YAML file validated strictly (unknown keys are errors, with suggestions).

What the config guards, so that no later stage has to:

- YAML is read with a bounded loader: a document whose alias-expanded size passes
  ``$MEDLENS_YAML_MAX_NODES`` nodes (a "billion laughs" bomb) is refused before it is built.
- ``name`` is one path component (it becomes ``output_dir/<name>``): no ``/``, ``\\``, ``..``, NUL.
- ``data.path`` and ``data.image_root`` keep ``$MEDLENS_DATA`` as written, so the saved ``config.yaml``
  records no local path; ``DataConfig.resolved_path()`` / ``resolved_image_root()`` expand it.
  No other environment variable is read from a config; ``$MEDLENS_MAX_EPOCHS`` and ``$MEDLENS_SMOKE`` (test
  aids, unset in use) cap epochs, samples, bootstrap resamples and patches of every config file loaded.
- Counts, strengths and fractions are range-checked; NaN and infinity are refused for every float.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medlens.data.sources import DataSource, get_source, list_sources
from medlens.errors import ConfigError, MedlensWarning
from medlens.safe_yaml import safe_load_yaml
from medlens.tasks import config_task
from medlens.utils import data_dir, positive_int_env, smoke_mode

# ------------------------------------------------------------------------------------- names, paths

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run folder name (one path component inside ``output_dir``), or None."""
    if not name or not name.strip():
        return "run name is empty"
    if name in (".", ".."):
        return f"run name {name!r} is not a folder name"
    if "/" in name or "\\" in name:
        return f"run name {ascii(name)} holds a path separator; use a single folder name"
    if _CONTROL.search(name):
        return f"run name {ascii(name)} holds a control character (NUL, newline...)"
    if name.startswith("."):
        return f"run name {ascii(name)} starts with '.'; hidden or relative names are not allowed"
    if len(name.encode("utf-8")) > 255:
        return "run name is longer than 255 bytes"
    return None


DATA_ENV = "MEDLENS_DATA"
_ENV_REF = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _check_env_refs(value: str) -> None:
    """Only ``$MEDLENS_DATA`` / ``${MEDLENS_DATA}`` may appear; other variables are neither read nor shown."""
    for m in _ENV_REF.finditer(value):
        var = m.group(1) if m.group(1) is not None else m.group(2)
        if var != DATA_ENV:
            raise ValueError(f"only ${DATA_ENV} is expanded in paths; write the path out instead of "
                             f"${ascii(var)[1:-1][:40]}")


def resolve_data_path(value: str | Path | None) -> Path | None:
    """A config path with ``$MEDLENS_DATA``/``${MEDLENS_DATA}`` replaced by the data root (its default,
    ``~/.medlens/data``, when the variable is unset). No other variable is expanded."""
    if value is None or str(value) == "":
        return None
    text = str(value)
    try:
        _check_env_refs(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    root = str(data_dir())
    return Path(_ENV_REF.sub(lambda _m: root, text))


THRESHOLD_RULES = ("youden", "f1", "sensitivity", "specificity", "fixed")
# evaluation.calibration: auto chooses among none and the task's scalings by cross-validation inside validation;
# a named scaling is fitted on validation as asked (the task decides which fit: medlens.tasks.Task.calibration_names)
CALIBRATIONS = ("auto", "none", "platt", "temperature", "isotonic")


def parse_threshold_rule(rule: str) -> tuple[str, float | None]:
    """``"youden"``, ``"f1"``, ``"sensitivity:0.9"``, ``"specificity:0.95"`` or ``"fixed:0.5"``.

    Lives here, at the bottom layer, so that the config validates the rule without importing
    ``medlens.evaluation``; ``medlens.evaluation.threshold`` applies it.
    """
    name, _, arg = str(rule).partition(":")
    name = name.strip().lower()
    if name not in THRESHOLD_RULES:
        raise ConfigError(f"unknown threshold rule '{rule}'; expected one of youden, f1, sensitivity:X, "
                          "specificity:X, fixed:X")
    if name in ("sensitivity", "specificity", "fixed"):
        try:
            val = float(arg)
        except ValueError:
            raise ConfigError(f"threshold rule '{rule}' needs a number, e.g. {name}:0.9") from None
        if not 0.0 <= val <= 1.0:  # NaN fails this too
            raise ConfigError(f"threshold rule '{rule}': {val} is outside [0, 1]")
        return name, val
    return name, None


def data_source(name: str) -> DataSource:
    """The registered ``medlens.data.sources`` entry named ``name``; ``ValueError`` with "did you mean" (in a
    validator, the config's one-line error names ``data.source``)."""
    try:
        return get_source(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def list_data_sources() -> list[DataSource]:
    return list_sources()


class _Strict(BaseModel):
    # NaN and infinity pass `gt`/`le` checks in surprising ways (inf > 0): refuse them for every float
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False,
                              validate_assignment=True)


class DataConfig(_Strict):
    """Where the images come from and how they become model inputs."""

    source: str = "medmnist"         # a registered data source (medlens.data.sources: medmnist, folder, csv, hdf5)
    name: str | None = None          # MedMNIST dataset name
    size: int = Field(default=28, ge=1)      # MedMNIST size, or the resize target for folder/csv
    path: str | None = None          # folder root, CSV manifest, patch store, or an explicit npz
    image_root: str | None = None    # CSV: folder the paths are relative to (and confined to)
    allow_outside_root: bool = False  # CSV: allow image/mask paths that leave image_root (absolute, ../, symlinks)
    path_column: str = "path"
    label_column: str = "label"
    # issue 26, CSV manifests: several 0/1 label columns, one per label (a multi-label task), or one numeric target
    # column (``task: regression``, e.g. an age or a score) in the unit ``target_unit`` (a UCUM code: a, mm, 1...)
    label_columns: list[str] | None = None
    target_column: str | None = None
    target_unit: str = Field(default="1", min_length=1, max_length=32, pattern=r"^[!-~]+$")
    patient_column: str = "patient_id"
    suffix: str = ""                 # CSV: appended to each path (Kaggle lists ids without .jpeg)
    color: Literal["gray", "rgb", "green"] = "gray"
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    check_md5: bool = True
    max_samples: int | None = Field(default=None, ge=1)  # cap each split (quick experiments, tests)
    # issue 17: a stratified share of the training labels kept (seeded; low-label studies); val/test untouched
    label_fraction: float = Field(default=1.0, gt=0, le=1)
    # issue 27, the prepared store of image files (medlens.data.store): its root folder (default $MEDLENS_CACHE, else
    # ~/.cache/medlens/store) and the worker processes that build it (default min(2, CPU count))
    store: str | None = None
    workers: int | None = Field(default=None, ge=1, le=64)
    normalize: Literal["dataset", "none"] = "dataset"
    # segmentation pairs (task: segmentation)
    mask_suffix: str | None = None       # folder: mask of <stem><image_suffix>.<ext> is <stem><mask_suffix>
    image_suffix: str = ""               # folder: e.g. "_image" for brain1_image.nrrd + brain1_label.nrrd
    reference_suffix: str | None = None  # folder: a second observer's mask, reported as the human reference
    mask_column: str = "mask"            # CSV: column with the mask path
    reference_column: str | None = None  # CSV: column with a second observer's mask
    # regex; group 1 (or the match) is the patient id: over the file name of segmentation pairs, over the
    # relative path (<class>/<file>, or the manifest's path) of classification files
    patient_pattern: str | None = None
    clahe: bool = False                  # CLAHE on 2D inputs (after the colour mode)
    intensity: Literal["unit", "zscore", "percentile"] = "unit"  # per-image scaling of segmentation inputs
    window: str | None = None            # CT window (name or "level,width") applied before scaling
    pixel_spacing: float | None = Field(default=None, gt=0)  # mm per pixel for 2D files that do not record it
    # DICOM modality tag (MR, CT, DX, ...) of training images whose files do not say it (NIfTI, NRRD, PNG): the
    # run's input profile records it, so predict/segment/serve/--push refuse another modality (issue 26)
    modality: str | None = Field(default=None, pattern=r"^[A-Z]{2,4}$")
    # classification labels: source label (class name or index) -> task label; null drops those samples
    label_map: dict[str | int, str | None] | None = None
    # binary: the task label that is the positive class (index 1); without it a folder's or manifest's two classes
    # take a conventional negative name (normal, negative, benign, healthy, control, no_*) as negative, or training
    # refuses, asking for it
    positive_class: str | None = None
    test_patient: str | None = None      # hdf5 store: hold this patient (seriesuid) out as the test split

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v):
        if v is None:
            return v
        out = {str(k): (None if t is None else str(t)) for k, t in v.items()}
        if len(out) != len(v):
            raise ValueError("data.label_map names a source label twice (e.g. 1 and '1')")
        kept = {t for t in out.values() if t is not None}
        if len(kept) < 2:
            raise ValueError("data.label_map must keep at least two task labels (null drops a label)")
        if any(not t.strip() for t in kept):
            raise ValueError("data.label_map: task labels must not be empty")
        return out


    @field_validator("label_columns")
    @classmethod
    def _label_columns(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("data.label_columns names at least two 0/1 label columns (one is data.label_column)")
        if len(set(v)) != len(v) or any(not c.strip() for c in v):
            raise ValueError("data.label_columns must be distinct, non-empty column names")
        return v

    @field_validator("source")
    @classmethod
    def _registered_source(cls, v: str) -> str:
        data_source(v)  # a registered source, or "did you mean" the closest one
        return v

    @field_validator("path", "image_root")
    @classmethod
    def _only_data_env(cls, v: str | None) -> str | None:
        if v is not None:
            _check_env_refs(v)
        return v

    @field_validator("patient_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction is {self.val_fraction + self.test_fraction:g}; "
                             "it must stay below 1 to leave training data")
        return self

    def resolved_path(self) -> Path | None:
        """``path`` with ``$MEDLENS_DATA`` expanded: what loaders open (the field keeps the portable form)."""
        return resolve_data_path(self.path)

    def resolved_image_root(self) -> Path | None:
        """``image_root`` with ``$MEDLENS_DATA`` expanded."""
        return resolve_data_path(self.image_root)


class ModelConfig(_Strict):
    name: str = "small_cnn"
    params: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None    # local weights file (state dict) for transfer learning
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes to freeze, or ["backbone"]


class AugmentConfig(_Strict):
    hflip: float = Field(default=0.0, ge=0, le=1)
    vflip: float = Field(default=0.0, ge=0, le=1)
    dflip: float = Field(default=0.0, ge=0, le=1)   # 3D only: flip the depth (slice) axis
    rot90: bool = False
    rotate: float = Field(default=0.0, ge=0, le=180)  # max degrees
    translate: float = Field(default=0.0, ge=0, le=0.5)  # fraction of size
    scale: float = Field(default=0.0, ge=0, le=0.5)      # max relative zoom
    shear: float = Field(default=0.0, ge=0, le=45)       # max shear angle in degrees (2D: x; 3D: x in each axial plane)
    brightness: float = Field(default=0.0, ge=0, le=1)
    contrast: float = Field(default=0.0, ge=0, le=1)
    noise: float = Field(default=0.0, ge=0, le=1)


class ProgressiveConfig(_Strict):
    """Progressive resizing: early epochs train on downsampled inputs, the size rising linearly to full."""

    start: float = Field(default=0.5, gt=0, lt=1)     # the first epoch's input size, as a fraction of the full size
    fraction: float = Field(default=0.5, gt=0, le=1)  # share of the epochs over which the size reaches full


class TrainConfig(_Strict):
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    momentum: float | None = Field(default=None, ge=0, lt=1)  # sgd (default 0.9) and rmsprop (default 0, as Keras)
    nesterov: bool = True                        # sgd: Nesterov momentum (needs momentum > 0)
    rmsprop_alpha: float = Field(default=0.9, gt=0, lt=1)  # rmsprop: decay of the squared-gradient average (Keras rho)
    scheduler: Literal["cosine", "none", "plateau"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)
    imbalance: Literal["none", "weighted_loss", "balanced_sampler", "undersample"] = "none"
    undersample_ratio: float = Field(default=1.0, gt=0)  # negatives per positive when undersampling
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    precision: Literal["32", "bf16-mixed"] = "bf16-mixed"
    channels_last: bool = False
    monitor: str = "val_auc"
    early_stopping_patience: int | None = Field(default=None, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    # issue 15: data-parallel processes per node x nodes (docs/distributed.md); auto = ddp when more than one
    devices: int = Field(default=1, ge=1)
    num_nodes: int = Field(default=1, ge=1)
    strategy: Literal["auto", "single", "ddp"] = "auto"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # issue 17: accuracy tools (each off by default)
    # decay of an exponential moving average of the weights; the average is what is validated, checkpointed as best
    # and saved
    ema: float | None = Field(default=None, gt=0, lt=1)
    mixup: float = Field(default=0.0, ge=0, le=10)   # Beta(a, a) of mixup (0: off)
    cutmix: float = Field(default=0.0, ge=0, le=10)  # Beta(a, a) of cutmix (0: off); with mixup, one of both per batch
    progressive: ProgressiveConfig | None = None     # progressive resizing (models with global pooling)
    ensemble: int = Field(default=1, ge=1, le=20)    # members trained with seeds seed, seed+1, ...; soft voting
    cv_folds: int = Field(default=0, ge=0, le=10)  # issue 30: k >= 2: k-fold CV on train+val, folds = the ensemble
    # wall-clock limit of fitting (all members); each member keeps its best checkpoint when its share runs out
    max_minutes: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _warmup(self) -> "TrainConfig":
        # the warm-up ends before the last epoch: capped at train.epochs - 1 (``--set train.epochs=1`` on a config
        # with a warm-up), said in a warning, and the capped value is what the run's config.yaml records
        if self.scheduler == "cosine" and self.warmup_epochs >= self.epochs:
            warnings.warn(f"train.warmup_epochs ({self.warmup_epochs}) capped at {self.epochs - 1}: the warm-up "
                          f"must end before the last of train.epochs ({self.epochs})", MedlensWarning, stacklevel=2)
            self.warmup_epochs = self.epochs - 1
        return self


class PublishedFigures(_Strict):
    """A published result to show beside the run's own (metric keys as in metrics.json: auc, ppv, sensitivity...)."""

    source: str = Field(min_length=1, max_length=300)   # the citation
    metrics: dict[str, float]
    note: str = Field(default="", max_length=500)                # how it differs (data, split, image size...)


class EvalConfig(_Strict):
    threshold: str = "youden"   # youden | sensitivity:0.9 | specificity:0.9 | fixed:0.5 | f1
    bootstrap: int = Field(default=1000, ge=0)
    ci: float = Field(default=0.95, gt=0, lt=1)
    tta: bool = False   # classifiers: average the probabilities over the flips that train.augment uses
    # probability calibration fitted on validation (CALIBRATIONS): auto (none or a scaling, by cross-validation
    # inside validation), none, platt (binary), temperature (binary, multi-class, ordinal) or isotonic (binary)
    calibration: str = "auto"
    calibration_bins: int = Field(default=15, ge=2, le=100)   # equal-width bins of ECE/MCE and the reliability diagram
    # decision-curve analysis over threshold probabilities [low, high] (binary runs)
    decision_curve: tuple[float, float] = (0.01, 0.60)
    # CSV-manifest columns whose groups get their own metrics (sex, age band, site, scanner...)
    subgroups: list[str] = Field(default_factory=list)
    min_subgroup: int = Field(default=30, ge=1)    # groups smaller than this are flagged as unreliable
    # a sensitivity/specificity drop from validation to test larger than this is flagged as threshold drift
    shift_tolerance: float = Field(default=0.05, gt=0, lt=1)
    # regression runs (issue 26): the coverage of the split-conformal prediction interval fitted on validation
    interval: float = Field(default=0.9, gt=0, lt=1)
    published: PublishedFigures | None = None   # e.g. a seed system's figures, shown beside ours in the report

    @field_validator("threshold")
    @classmethod
    def _rule(cls, v: str) -> str:
        try:
            parse_threshold_rule(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, v: str) -> str:
        if v not in CALIBRATIONS:
            close = difflib.get_close_matches(v, CALIBRATIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"evaluation.calibration: unknown '{str(v)[:40]}'{hint}; expected one of "
                             f"{', '.join(CALIBRATIONS)}")
        return v

    @field_validator("decision_curve")
    @classmethod
    def _dca_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1] < 1:
            raise ValueError(f"evaluation.decision_curve {list(v)}: give [low, high] with 0 < low < high < 1")
        return v


class DicomCode(_Strict):
    """A coded concept (e.g. SNOMED CT ``SCT``): code value, coding scheme designator, code meaning."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class SegmentDicomCodes(_Strict):
    """DICOM SEG codes of one foreground class: segmented property category and type, anatomic region."""

    category: DicomCode
    type: DicomCode
    region: DicomCode | None = None


class SegmentationConfig(_Strict):
    """Patch sampling, loss, sliding-window inference and post-processing of segmentation runs."""

    patch_size: list[int] = Field(default_factory=lambda: [128, 128])
    patches_per_epoch: int = Field(default=1024, ge=1)
    foreground_ratio: float = Field(default=0.5, ge=0, le=1)  # share of patches centred on a foreground voxel
    loss: Literal["dice_ce", "dice_focal", "dice", "focal", "tversky", "ce"] = "dice_ce"
    tversky_alpha: float = Field(default=0.3, ge=0, le=1)  # weight of false positives
    tversky_beta: float = Field(default=0.7, ge=0, le=1)   # weight of false negatives
    overlap: float = Field(default=0.25, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(default=8, ge=1)
    tta: bool = False                 # average over flips at inference
    threshold: str = "val"            # "val" (best mean Dice on validation) or "fixed:0.5"
    largest_components: int | None = Field(default=None, ge=1)  # keep the N largest connected components
    min_size: int = Field(default=0, ge=0)     # remove components smaller than this many voxels
    label_values: list[int] | None = None  # raw mask values, in class order; default {0, 1} or {0, 255}
    class_names: list[str] | None = None
    val_every: int = Field(default=1, ge=1)    # epochs between full-image validations
    cldice: bool = False               # centre-line Dice (tubular structures: vessels)
    # DICOM SEG/SR codes, one entry per foreground class in class order (e.g. SNOMED CT Blood vessel in Retina)
    dicom_codes: list[SegmentDicomCodes] | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _check(self) -> "SegmentationConfig":
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 8:
            raise ValueError("segmentation.patch_size: 2 or 3 sizes, each >= 8")
        if self.threshold != "val":
            try:
                assert self.threshold.startswith("fixed:")
                assert 0 < float(self.threshold.split(":", 1)[1]) < 1
            except (AssertionError, ValueError):
                raise ValueError(f"segmentation.threshold '{self.threshold}': use 'val' or 'fixed:<0-1>'") from None
        if self.loss == "tversky" and self.tversky_alpha + self.tversky_beta <= 0:
            raise ValueError("segmentation.tversky_alpha + tversky_beta must be above 0")
        if self.label_values is not None:
            if len(self.label_values) < 2 or len(set(self.label_values)) != len(self.label_values):
                raise ValueError(f"segmentation.label_values {self.label_values}: at least 2 distinct values "
                                 "(background first)")
            if self.class_names is not None and len(self.class_names) != len(self.label_values):
                raise ValueError(f"segmentation.class_names has {len(self.class_names)} names for "
                                 f"{len(self.label_values)} label_values")
        if self.class_names is not None and (len(set(self.class_names)) != len(self.class_names)
                                             or not all(n.strip() for n in self.class_names)):
            raise ValueError("segmentation.class_names must be distinct, non-empty names")
        return self


class AnomalyConfig(_Strict):
    """Unsupervised anomaly detection (``task: anomaly``): an autoencoder learns the normal class only."""

    normal_class: str = "normal"     # the class name (or index) the autoencoder learns; every other is anomalous
    # the anomaly score: reconstruction error (mse, l1), SSIM dissimilarity, or auto: the best validation AUC
    score: Literal["auto", "mse", "l1", "ssim"] = "auto"
    compare_run: str | None = None   # a supervised run folder on the same data, reported beside (AUC, Grad-CAM)
    cases: int = Field(default=3, ge=1, le=12)  # report: test cases per group (anomaly map beside supervised Grad-CAM)


class ExplainConfig(_Strict):
    """The report's explanation (issue 26): ``method`` names one (``medlens explain --list``); without it the
    method most faithful (deletion and insertion against random) on ``select_images`` validation images."""

    method: str | None = None
    select_images: int = Field(default=8, ge=2, le=64)
    score_images: int = Field(default=32, ge=2, le=256)   # test images that score the shown method against random


class ExperimentConfig(_Strict):
    name: str = "experiment"        # the run folder is output_dir/<name>: one path component
    # a config name of a registered task (medlens.tasks): classification, segmentation, anomaly
    task: str = "classification"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # numpy and Lightning take unsigned 32-bit seeds
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    # issue 17: what `medlens plan` recorded (fingerprint, measured speed, each decision with its reason).
    # Data about the config, never read by training.
    plan: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _single_component(cls, v: str) -> str:
        problem = run_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("task")
    @classmethod
    def _registered_task(cls, v: str) -> str:
        try:
            config_task(v)  # a registered task's config name, or "did you mean" the closest one
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        task = config_task(self.task)
        source = data_source(self.data.source)
        if source.needs_path and not self.data.path:
            raise ValueError(f"data.path is required for source '{source.name}'")
        source.check(self.data, task)
        if task.dense:  # image + mask pairs
            if not source.pairs:
                have = " or ".join(f"'{s.name}'" for s in list_data_sources() if s.pairs)
                raise ValueError(f"segmentation data (image + mask pairs) come from data.source {have}")
        elif not source.reads_files and (self.data.clahe or self.data.window):
            # those sources hold prepared arrays: a window or CLAHE here would apply at prediction only
            raise ValueError(f"data.clahe and data.window prepare image files (folder or CSV sources); the "
                             f"'{source.name}' source holds prepared arrays")
        if task.dense and (self.data.label_map or self.data.positive_class):
            raise ValueError("data.label_map and data.positive_class relabel classifiers; segmentation classes "
                             "come from segmentation.label_values")
        if self.data.test_patient is not None and not source.holds_out_patient:
            raise ValueError("data.test_patient holds out one patient of a patch store (data.source: hdf5)")
        if self.data.label_map and self.data.positive_class is not None and \
                self.data.positive_class not in set(self.data.label_map.values()):
            raise ValueError(f"data.positive_class {self.data.positive_class!r} is not one of the task labels of "
                             f"data.label_map {sorted({t for t in self.data.label_map.values() if t})}")
        if task.flip_tta and self.evaluation.tta:
            a = self.train.augment
            if not (a.hflip or a.vflip or a.dflip):
                raise ValueError("evaluation.tta averages over the flips that training uses; train.augment has no "
                                 "hflip, vflip or dflip")
        self._check_targets(task, source)
        if self.evaluation.subgroups and (not source.subgroups or not task.subgroups):
            raise ValueError("evaluation.subgroups names columns of a classification CSV manifest (data.source: csv)")
        return self


    def _check_targets(self, task, source: DataSource) -> None:
        """Issue 26: several label columns (multi-label) and a numeric target (regression) of a CSV manifest."""
        d = self.data
        if (d.label_columns or d.target_column) and not source.label_columns:
            have = " or ".join(f"'{s.name}'" for s in list_data_sources() if s.label_columns)
            raise ValueError(f"data.label_columns and data.target_column name columns of a manifest (data.source {have})")
        if d.label_columns and (task.dense or task.numeric):
            raise ValueError(f"data.label_columns: a multi-label classification (task: classification), not {self.task}")
        if task.numeric and not d.target_column:
            raise ValueError(f"task {self.task} reads a numeric column: set data.target_column")
        if d.target_column and not task.numeric:
            raise ValueError("data.target_column is the numeric target of a regression (task: regression)")
        if (d.label_columns or d.target_column) and (d.label_map or d.positive_class):
            raise ValueError("data.label_map and data.positive_class relabel one class column; not with "
                             "data.label_columns or data.target_column")
        if d.label_columns and d.target_column:
            raise ValueError("data.label_columns (multi-label) and data.target_column (regression): one or the other")
        if task.numeric and self.train.ensemble > 1:
            raise ValueError("train.ensemble votes over class probabilities; a regression trains one network")
        if task.numeric and self.train.monitor not in task.monitors and "monitor" not in self.train.model_fields_set:
            self.train.monitor = task.monitor   # the default follows the task (val_loss for a regression)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    cur: Any = model
    for part in loc[:-1]:
        f = getattr(cur, "model_fields", {}).get(part)
        if f is None:
            return []
        cur = f.annotation
    return list(getattr(cur, "model_fields", {}).keys())


def _format(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(ExperimentConfig, loc), n=1)
            hint = f" (did you mean '{'.'.join(loc[:-1] + (close[0],))}'?)" if close else ""
            msgs.append(f"unknown key '{key}'{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        named = not key or msg.startswith((key + ".", key + ":"))  # the message already names its key
        msgs.append(msg if named else f"'{key}': {msg}")
    return "; ".join(msgs)


def config_from_dict(d: dict, source: str | Path | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(d or {})
    except ValidationError as e:
        raise ConfigError(_format(e), source) from None
    except ConfigError as e:
        raise ConfigError(str(e), source) from None


def apply_override(d: dict, override: str, source: str | Path | None = None) -> None:
    """Set ``key.sub=value`` (the value read as bounded YAML) in the raw config mapping ``d``."""
    key, eq, val = override.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"override {ascii(override)[:80]} is not key.sub=value", source)
    cur = d
    for i, p in enumerate(parts[:-1]):
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section", source)
    cur[parts[-1]] = safe_load_yaml(val, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; ``overrides`` are ``key.sub=value`` strings (YAML values).

    Overrides are validated exactly like the file (``--set name=../x`` is refused like ``name: ../x``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config ({type(e).__name__})", path) from None
    d = safe_load_yaml(text, path) or {}
    if not isinstance(d, dict):
        raise ConfigError("a config is a YAML mapping of sections (data, model, train, evaluation)", path)
    for ov in overrides or []:
        apply_override(d, ov, path)
    cfg = config_from_dict(d, path)
    cap = max_epochs_cap()
    if cap is not None and cfg.train.epochs > cap:
        train = cfg.train.model_copy(update={"epochs": cap,
                                             "warmup_epochs": min(cfg.train.warmup_epochs, cap - 1)})
        cfg = cfg.model_copy(update={"train": train})
    if smoke_mode():
        cfg = cfg.model_copy(update={
            "data": cfg.data.model_copy(update={"max_samples": min(cfg.data.max_samples or SMOKE_SAMPLES,
                                                                   SMOKE_SAMPLES)}),
            "evaluation": cfg.evaluation.model_copy(update={"bootstrap": min(cfg.evaluation.bootstrap, 20)}),
            "segmentation": cfg.segmentation.model_copy(update={
                "patches_per_epoch": min(cfg.segmentation.patches_per_epoch, 16),
                "overlap": min(cfg.segmentation.overlap, 0.25), "cldice": False}),
            "explain": cfg.explain.model_copy(update={
                "select_images": min(cfg.explain.select_images, SMOKE_EXPLAIN_IMAGES),
                "score_images": min(cfg.explain.score_images, SMOKE_EXPLAIN_IMAGES)})})
    return cfg


MAX_EPOCHS_ENV = "MEDLENS_MAX_EPOCHS"
#: ``$MEDLENS_SMOKE=1`` (``medlens.utils.smoke_mode``), the README test's other aid: every config loaded from a
#: file also uses at most ``SMOKE_SAMPLES`` samples per split, 20 bootstrap resamples, 16 segmentation patches per
#: epoch, a 0.25 sliding-window overlap, no clDice, and ``SMOKE_EXPLAIN_IMAGES`` images to choose and score the
#: report's explanation method, so each documented command proves it runs in seconds. Its figures mean nothing;
#: unset in use.
SMOKE_SAMPLES = 96
SMOKE_EXPLAIN_IMAGES = 4


def max_epochs_cap() -> int | None:
    """``$MEDLENS_MAX_EPOCHS``: a test aid that caps ``train.epochs`` of every config loaded from a file (the
    README test runs each documented training in seconds). Unset: no cap. Read here and nowhere else."""
    return positive_int_env(MAX_EPOCHS_ENV)


def dump_config(cfg: ExperimentConfig) -> str:
    """The config as YAML, as written: ``$MEDLENS_DATA`` stays unexpanded, so no local path is recorded."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
