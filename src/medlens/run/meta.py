"""``RunMeta``: the typed, versioned content of a run's ``run.json``. This module alone reads and writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medlens import __version__
from medlens.errors import DataError, MedlensError
from medlens.run.profile import InputProfile
from medlens.tasks import TaskType
from medlens.transforms.preprocess import InputSpec
from medlens.utils import write_json_atomic

#: bumped whenever a field changes meaning; runs of another version are refused with a clear error
SCHEMA_VERSION = 3
META_FILE = "run.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputPrep(_Strict):
    """How inputs are prepared (``transforms.preprocess.InputSpec``) and normalised inside the model."""

    spatial_dims: int
    size: list[int] | None = None     # classifier resize target; None: native grid (segmentation)
    color: Literal["gray", "rgb", "green"] = "gray"
    clahe: bool = False
    window: str | None = None
    intensity: Literal["unit", "zscore", "percentile"] = "unit"
    mean: list[float]
    std: list[float]
    pixel_spacing: float | None = None   # mm per pixel of 2D files that do not record it

    def spec(self) -> InputSpec:
        return InputSpec(self.spatial_dims, tuple(self.size) if self.size else None, self.color, self.clahe,
                         self.window, self.intensity)


class Threshold(_Strict):
    """The decision threshold, chosen on validation only (binary classifiers, two-class segmenters)."""

    rule: str
    value: float
    chosen_on: Literal["val", "site"] = "val"   # site: a site's own labelled sample (``medlens recalibrate``)
    val_score: float | None = None    # the validation score at this threshold (segmentation: mean Dice)


class Calibration(_Strict):
    """Probability calibration fitted on the validation split only (``evaluation.calibration``).

    ``platt`` (binary): ``p' = sigmoid(a * logit(p) + b)``; ``temperature`` (multi-class/ordinal):
    ``p' = softmax(log(p) / t)``, which keeps the argmax. Both keep the ranking, so AUC is unchanged.
    """

    method: Literal["platt", "temperature"]
    params: dict[str, float]
    fitted_on: Literal["val", "site"] = "val"
    n: int

    def apply(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        if self.method == "platt":
            q = np.clip(p, 1e-7, 1 - 1e-7)
            z = self.params["a"] * np.log(q / (1 - q)) + self.params["b"]
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        z = np.log(np.clip(p, 1e-12, 1.0)) / self.params["t"]
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class RunMeta(_Strict):
    schema_version: int = SCHEMA_VERSION
    medlens_version: str = __version__
    status: Literal["training", "complete"] = "training"
    kind: Literal["torch", "classical"] = "torch"
    task: TaskType
    model: str
    model_params: dict[str, Any] = Field(default_factory=dict)
    in_channels: int
    n_outputs: int
    input_size: list[int]             # the network's input (classifiers) or patch size (segmenters)
    class_names: list[str]
    label_values: list[int] | None = None   # segmentation: raw mask values in class order
    preprocessing: InputPrep
    threshold: Threshold | None = None
    calibration: Calibration | None = None
    recalibrated_on: dict[str, Any] | None = None   # the site sample a recalibrated copy was adapted to
    dataset: str | None = None
    split_method: str = ""
    n_samples: dict[str, int] = Field(default_factory=dict)
    class_counts: dict[str, list[int]] | None = None
    patients: dict[str, list[str]] | None = None
    transfer: dict[str, Any] | None = None
    n_features: int | None = None
    train_seconds: float | None = None
    epochs_run: int | None = None
    best_epoch_metric: dict[str, float | None] | None = None
    environment: dict[str, Any] | None = None
    time_limited: bool = False        # fitting stopped early at train.max_minutes (the best checkpoint was kept)
    members: list[dict[str, Any]] | None = None   # train.ensemble: seed, epochs, best score, time limit per member
    # what the training inputs looked like (modality, colour, size, intensity histogram): predict warns
    # when an input falls outside it (``medlens.run.profile``); absent in runs written before it existed
    input_profile: InputProfile | None = None
    # task: anomaly (issue 18): the autoencoder learnt only this class; the score and how it was chosen
    anomaly: dict[str, Any] | None = None

    @property
    def spatial_dims(self) -> int:
        return self.preprocessing.spatial_dims

    def save(self, run_dir: str | Path) -> Path:
        return write_json_atomic(Path(run_dir) / META_FILE, self.model_dump(mode="json"))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunMeta":
        run = Path(run_dir)
        path = run / META_FILE
        if not run.is_dir():
            raise MedlensError("run folder not found", run)
        if not path.is_file():
            raise MedlensError("not a medlens run folder (no run.json)", run)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"corrupt run.json ({' '.join(str(e).split())[:120]})", path) from None
        if not isinstance(raw, dict):
            raise DataError("corrupt run.json (not an object)", path)
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            made = raw.get("medlens_version", "an older medlens")
            raise MedlensError(f"run.json has schema version {version} (written by medlens {made}); this medlens "
                               f"{__version__} reads version {SCHEMA_VERSION}: retrain the run, or open it with "
                               "the medlens that wrote it", path)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise DataError(f"invalid run.json ({where}: {first['msg']})", path) from None
