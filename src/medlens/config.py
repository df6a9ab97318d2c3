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


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "ExperimentConfig":
        if self.data.source == "medmnist" and not self.data.name:
            raise ValueError("data.name is required for source 'medmnist' (e.g. pneumoniamnist)")
        if self.data.source in ("folder", "csv", "hdf5") and not self.data.path:
            raise ValueError(f"data.path is required for source '{self.data.source}'")
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
