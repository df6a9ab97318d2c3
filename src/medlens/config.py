"""Experiment configuration: a YAML file validated strictly (unknown keys are errors, with suggestions)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medlens.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    """Where the images come from and how they become model inputs."""

    source: Literal["medmnist", "folder", "csv", "hdf5"] = "medmnist"
    name: str | None = None          # MedMNIST dataset name
    size: int = 28                   # MedMNIST size, or the resize target for folder/csv
    path: str | None = None          # folder root, CSV manifest, patch store, or an explicit npz
    image_root: str | None = None    # CSV: folder the paths are relative to
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str = "patient_id"
    suffix: str = ""                 # CSV: appended to each path (Kaggle lists ids without .jpeg)
    color: Literal["gray", "rgb", "green"] = "gray"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    check_md5: bool = True
    max_samples: int | None = Field(None, ge=1)  # cap each split (quick experiments, tests)
    normalize: Literal["dataset", "none"] = "dataset"
    # segmentation pairs (task: segmentation)
    mask_suffix: str | None = None       # folder: mask of <stem><image_suffix>.<ext> is <stem><mask_suffix>
    image_suffix: str = ""               # folder: e.g. "_image" for brain1_image.nrrd + brain1_label.nrrd
    reference_suffix: str | None = None  # folder: a second observer's mask, reported as the human reference
    mask_column: str = "mask"            # CSV: column with the mask path
    reference_column: str | None = None  # CSV: column with a second observer's mask
    patient_pattern: str | None = None   # regex on the file name; group 1 (or the match) is the patient id
    clahe: bool = False                  # CLAHE on 2D inputs (after the colour mode)
    intensity: Literal["unit", "zscore", "percentile"] = "unit"  # per-image scaling of segmentation inputs
    window: str | None = None            # CT window (name or "level,width") applied before scaling
    pixel_spacing: float | None = Field(None, gt=0)  # mm per pixel for 2D files that do not record it


    @model_validator(mode="after")
    def _expand(self) -> "DataConfig":
        # "$MEDLENS_DATA/..." in paths: the data root even when the variable is unset (its default then)
        import os

        from medlens.utils import data_dir

        for key in ("path", "image_root"):
            v = getattr(self, key)
            if v and "$" in v:
                v = v.replace("${MEDLENS_DATA}", str(data_dir())).replace("$MEDLENS_DATA", str(data_dir()))
                object.__setattr__(self, key, os.path.expandvars(v))
        return self


class ModelConfig(_Strict):
    name: str = "small_cnn"
    params: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None    # local weights file (state dict) for transfer learning
    freeze: list[str] = Field(default_factory=list)  # parameter-name prefixes to freeze, or ["backbone"]


class AugmentConfig(_Strict):
    hflip: float = Field(0.0, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    rot90: bool = False
    rotate: float = Field(0.0, ge=0, le=180)  # max degrees
    translate: float = Field(0.0, ge=0, le=0.5)  # fraction of size
    scale: float = Field(0.0, ge=0, le=0.5)      # max relative zoom
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    noise: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none", "plateau"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    imbalance: Literal["none", "weighted_loss", "balanced_sampler", "undersample"] = "none"
    undersample_ratio: float = Field(1.0, gt=0)  # negatives per positive when undersampling
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["32", "bf16-mixed"] = "bf16-mixed"
    channels_last: bool = False
    monitor: str = "val_auc"
    early_stopping_patience: int | None = Field(None, ge=1)
    num_threads: int | None = Field(None, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class EvalConfig(_Strict):
    threshold: str = "youden"   # youden | sensitivity:0.9 | specificity:0.9 | fixed:0.5 | f1
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    tta: bool = False


class SegmentationConfig(_Strict):
    """Patch sampling, loss, sliding-window inference and post-processing of segmentation runs."""

    patch_size: list[int] = Field(default_factory=lambda: [128, 128])
    patches_per_epoch: int = Field(1024, ge=1)
    foreground_ratio: float = Field(0.5, ge=0, le=1)  # share of patches centred on a foreground voxel
    loss: Literal["dice_ce", "dice_focal", "dice", "focal", "tversky", "ce"] = "dice_ce"
    tversky_alpha: float = Field(0.3, ge=0, le=1)  # weight of false positives
    tversky_beta: float = Field(0.7, ge=0, le=1)   # weight of false negatives
    overlap: float = Field(0.25, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(8, ge=1)
    tta: bool = False                 # average over flips at inference
    threshold: str = "val"            # "val" (best mean Dice on validation) or "fixed:0.5"
    largest_components: int | None = Field(None, ge=1)  # keep the N largest connected components
    min_size: int = Field(0, ge=0)     # remove components smaller than this many voxels
    label_values: list[int] | None = None  # raw mask values, in class order; default {0, 1} or {0, 255}
    class_names: list[str] | None = None
    val_every: int = Field(1, ge=1)    # epochs between full-image validations
    cldice: bool = False               # centre-line Dice (tubular structures: vessels)

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
        return self


class ExperimentConfig(_Strict):
    name: str = "experiment"
    task: Literal["classification", "segmentation"] = "classification"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.data.source == "medmnist" and not self.data.name:
            raise ValueError("data.name is required for source 'medmnist' (e.g. pneumoniamnist)")
        if self.data.source in ("folder", "csv", "hdf5") and not self.data.path:
            raise ValueError(f"data.path is required for source '{self.data.source}'")
        if self.task == "segmentation":
            if self.data.source not in ("folder", "csv"):
                raise ValueError("segmentation data come from a folder (data.mask_suffix) or a CSV manifest")
            if self.data.source == "folder" and not self.data.mask_suffix:
                raise ValueError("data.mask_suffix is required for a segmentation folder (e.g. '_mask.png')")
        from medlens.evaluation.threshold import parse_threshold_rule

        parse_threshold_rule(self.evaluation.threshold)
        return self


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
        elif key:
            msgs.append(f"'{key}': {e['msg']}")
        else:
            msgs.append(e["msg"].removeprefix("Value error, "))
    return "; ".join(msgs)


def config_from_dict(d: dict, source: str | Path | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(d or {})
    except ValidationError as e:
        raise ConfigError(_format(e), source) from None
    except ConfigError as e:
        raise ConfigError(str(e), source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; ``overrides`` are ``key.sub=value`` strings (YAML values)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("config file not found", path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(d, dict):
        raise ConfigError("a config is a YAML mapping of sections (data, model, train, evaluation)", path)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not key=value", path)
        key, val = ov.split("=", 1)
        cur = d
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(val)
    return config_from_dict(d, path)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
