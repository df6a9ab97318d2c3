"""``RunMeta``: the typed, versioned content of a run's ``run.json``. This module alone reads and writes it.

``run.json`` is read like any other input (issue 25): a hand-edited or hostile file is refused in one line
naming the field, never used. A threshold is a probability in [0, 1]; calibration parameters are finite,
complete and of the right sign (a Platt slope or a temperature that is not positive would invert or
break every answer); the class names fit the task and the outputs; sizes, spacings, windows and model
parameters are finite, positive and bounded (the image limits of ``medlens.io.limits``); the file itself
is bounded in bytes and in nesting depth.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

from medlens import __version__
from medlens.errors import ConfigError, DataError, MedlensError
from medlens.io import limits
from medlens.io.windows import parse_window
from medlens.run.profile import InputProfile
from medlens.tasks import check_run_task, get_task
from medlens.transforms.preprocess import InputSpec
from medlens.utils import write_json_atomic

#: bumped whenever a field changes meaning; runs of another version are refused with a clear error
SCHEMA_VERSION = 3
META_FILE = "run.json"

MAX_META_BYTES = 64 * 1024 * 1024   # a run.json is kilobytes (megabytes with very many patient IDs)
MAX_DEPTH = 32                      # nesting of run.json; the deepest medlens writes is under 8
MAX_AXIS = 8192                     # one axis of a model input or a resize target
MAX_CHANNELS = 1024
MAX_CLASSES = 10_000
# any number among model_params (sklearn's C or random_state included); the network a torch run's
# parameters describe is also measured against its weights file (``Run._check_network_size``)
MAX_PARAM_INT = 2 ** 31 - 1
MAX_PARAM_FLOAT = 1e15
MAX_PARAM_ITEMS = 1024              # values in model_params, all levels together
MAX_PARAM_DEPTH = 8
MAX_SPACING_MM = 1e4
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MAX_PLATT = 1e6
MAX_KNOTS = 256   # isotonic calibration: bounded, so run.json and the ONNX metadata stay small


def _finite(v: float, what: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{what} is {v}, not a finite number")
    return v


def _check_shape(size: list[int], spatial_dims: int, what: str = "") -> None:
    """A model input or resize target: one positive axis per spatial dimension, within the image limits."""
    what = f"{what} {size}" if what else str(size)
    if len(size) != spatial_dims:
        raise ValueError(f"{what} has {len(size)} axes; the model is {spatial_dims}D")
    if any(s < 1 or s > MAX_AXIS for s in size):
        raise ValueError(f"{what}: every axis must be between 1 and {MAX_AXIS}")
    n = math.prod(size)
    limit = limits.max_pixels() if spatial_dims == 2 else limits.max_voxels()
    if n > limit:
        env = limits.MAX_PIXELS_ENV if spatial_dims == 2 else limits.MAX_VOXELS_ENV
        raise ValueError(f"{what} = {n:,} values, over the limit of {limit:,} ({env})")


def _bounded_params(params: Any, root: str) -> None:
    """Model parameters are plain values of bounded size: no huge widths, no NaN, no deep or long trees."""
    stack, seen = [(params, root, 0)], 0
    while stack:
        v, where, depth = stack.pop()
        seen += 1
        if seen > MAX_PARAM_ITEMS:
            raise ValueError(f"more than {MAX_PARAM_ITEMS} values")
        if depth > MAX_PARAM_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_PARAM_DEPTH} levels")
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int):
            if abs(v) > MAX_PARAM_INT:
                raise ValueError(f"{where} is {v}, beyond the bound of {MAX_PARAM_INT:,}")
        elif isinstance(v, float):
            if not math.isfinite(v) or abs(v) > MAX_PARAM_FLOAT:
                raise ValueError(f"{where} is {v}, not a finite number within {MAX_PARAM_FLOAT:g}")
        elif isinstance(v, str):
            if len(v) > 1000:
                raise ValueError(f"{where} is a string of {len(v)} characters (at most 1000)")
        elif isinstance(v, dict):
            stack.extend((x, f"{where}.{k}".lstrip("."), depth + 1) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v))
        else:
            raise ValueError(f"{where} has a value of type {type(v).__name__}")


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (0 for a scalar), counted without recursion."""
    best, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            best = max(best, d)
            if d <= MAX_DEPTH:   # deeper than the bound: already refused, no need to walk on
                stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return best


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

    @field_validator("spatial_dims")
    @classmethod
    def _dims(cls, v: int) -> int:
        if v not in (2, 3):
            raise ValueError(f"{v}: medlens models are 2D or 3D")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _stats(cls, v: list[float], info) -> list[float]:
        for x in v:
            _finite(x, "a value")
        if info.field_name == "std" and any(x < 0 for x in v):
            raise ValueError(f"{v}: a standard deviation cannot be negative")
        return v

    @field_validator("pixel_spacing")
    @classmethod
    def _spacing(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v <= MAX_SPACING_MM):
            raise ValueError(f"{v} mm: a pixel spacing must be finite, > 0 and at most {MAX_SPACING_MM:g} mm")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            level, width = parse_window(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if not (math.isfinite(level) and math.isfinite(width) and width > 0):
            raise ValueError(f"'{v}': a window needs a finite level and a finite width > 0")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int] | None, info) -> list[int] | None:
        if v is not None and "spatial_dims" in info.data:   # absent: spatial_dims itself was refused
            _check_shape(v, info.data["spatial_dims"])
        return v

    def spec(self) -> InputSpec:
        return InputSpec(self.spatial_dims, tuple(self.size) if self.size else None, self.color, self.clahe,
                         self.window, self.intensity)


class Threshold(_Strict):
    """The decision threshold, chosen on validation only (binary classifiers, two-class segmenters)."""

    rule: str
    value: float
    chosen_on: Literal["val", "site"] = "val"   # site: a site's own labelled sample (``medlens recalibrate``)
    val_score: float | None = None    # the validation score at this threshold (segmentation: mean Dice)

    @field_validator("value")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{v} is not a probability in [0, 1]")
        return v

    @field_validator("val_score")
    @classmethod
    def _score(cls, v: float | None) -> float | None:
        return v if v is None else _finite(v, "val_score")


class Calibration(_Strict):
    """Probability calibration fitted on the validation split only (``evaluation.calibration``).

    ``platt`` (binary): ``p' = sigmoid(a * logit(p) + b)``; ``temperature``: ``p' = softmax(log(p) / t)``
    (multi-class/ordinal, which keeps the argmax) or ``sigmoid(logit(p) / t)`` (binary); ``isotonic`` (binary):
    ``p'`` interpolated linearly between ``knots`` ``[[p...], [p'...]]`` (at most ``MAX_KNOTS``, both in [0, 1],
    ``p`` strictly and ``p'`` weakly increasing; constant outside). All keep the ranking (isotonic may tie it).
    The slope ``a`` and the temperature ``t`` must be positive: anything else reverses or breaks the ranking.
    """

    method: Literal["platt", "temperature", "isotonic"]
    params: dict[str, float]
    knots: list[list[float]] | None = None
    fitted_on: Literal["val", "site"] = "val"
    n: int = Field(ge=0)

    @field_validator("params")
    @classmethod
    def _params(cls, params: dict[str, float], info) -> dict[str, float]:
        method = info.data.get("method")
        if method is None:   # the method itself was refused
            return params
        want = {"platt": ("a", "b"), "temperature": ("t",)}.get(method, ())
        missing = [k for k in want if k not in params]
        extra = sorted(set(params) - set(want))
        if missing or extra:
            raise ValueError(f"{method} calibration takes {' and '.join(want) or 'no params'}; "
                             + (f"'{missing[0]}' is missing" if missing else f"'{extra[0]}' is not one of them"))
        for k, v in params.items():
            _finite(v, k)
        if method == "platt" and not params["a"] > 0:
            raise ValueError(f"a is {params['a']}: a Platt slope must be > 0 (it would invert the ranking)")
        if method == "platt" and (params["a"] > MAX_PLATT or abs(params["b"]) > MAX_PLATT):
            raise ValueError(f"a = {params['a']}, b = {params['b']}: a Platt fit on logits stays within "
                             f"{MAX_PLATT:g} (larger turns every probability into 0 or 1)")
        if method == "temperature" and not MIN_TEMPERATURE <= params["t"] <= MAX_TEMPERATURE:
            raise ValueError(f"t is {params['t']}: a temperature must be between {MIN_TEMPERATURE:g} and "
                             f"{MAX_TEMPERATURE:g}")
        return params

    @model_validator(mode="after")
    def _knots(self) -> "Calibration":
        if self.method != "isotonic":
            if self.knots is not None:
                raise ValueError(f"knots: a {self.method} calibration has none")
            return self
        k = self.knots
        if k is None or len(k) != 2 or len(k[0]) != len(k[1]) or not 2 <= len(k[0]) <= MAX_KNOTS:
            raise ValueError(f"knots: isotonic calibration takes [[p...], [p'...]] of 2 to {MAX_KNOTS} points each")
        x, y = np.asarray(k[0], np.float64), np.asarray(k[1], np.float64)
        if not (np.isfinite(x).all() and np.isfinite(y).all()) or x.min() < 0 or x.max() > 1 or y.min() < 0 \
                or y.max() > 1:
            raise ValueError("knots: isotonic knots must be finite probabilities in [0, 1]")
        if not (np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0)):
            raise ValueError("knots: isotonic knots must increase (p strictly, p' weakly)")
        return self

    def apply(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        with np.errstate(over="ignore"):   # exp overflow of a steep slope is a probability of 0 or 1
            if self.method == "isotonic" and self.knots is not None:
                return np.interp(p, self.knots[0], self.knots[1]).astype(np.float32)
            if self.method == "platt" or p.ndim == 1:   # temperature on one binary score scales its logit
                q = np.clip(p, 1e-7, 1 - 1e-7)
                a, b = (self.params["a"], self.params["b"]) if self.method == "platt" else (1 / self.params["t"], 0.0)
                z = a * np.log(q / (1 - q)) + b
                return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
            z = np.log(np.clip(p, 1e-12, 1.0)) / self.params["t"]
            z -= z.max(axis=-1, keepdims=True)
            e = np.exp(z)
            return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class PredictionInterval(_Strict):
    """A regression run's prediction interval (issue 26), split-conformal: ``value +- half_width`` covers the true
    value of a new case with probability ``coverage`` when ``half_width`` is the ``ceil((n + 1) coverage) / n``
    empirical quantile of the ``n`` absolute validation residuals (Lei et al. 2018). Fitted on validation only."""

    method: Literal["split-conformal"] = "split-conformal"
    coverage: float = Field(gt=0, lt=1)
    half_width: float = Field(ge=0)
    n: int = Field(ge=1)
    fitted_on: Literal["val"] = "val"

    @field_validator("coverage", "half_width")
    @classmethod
    def _finite_values(cls, v: float, info) -> float:
        return _finite(v, info.field_name)


ExportKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]


class ExportRecord(_Strict):
    """An exported model file (``RUN/export/<file>``) and the SHA-256 of its bytes, written by ``medlens export``.

    Whoever loads the file (``serve``, the standalone loader given the run) checks the hash first: the
    graph that runs is the one that passed the parity check, not any file that copies its metadata."""

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class RunMeta(_Strict):
    schema_version: int = SCHEMA_VERSION
    medlens_version: str = __version__
    status: Literal["training", "complete", "failed"] = "training"
    kind: Literal["torch", "classical"] = "torch"
    task: str                         # a registered task a run may record (medlens.tasks)
    model: str
    model_params: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = Field(ge=1, le=MAX_CHANNELS)
    n_outputs: int = Field(ge=1, le=MAX_CLASSES)
    input_size: list[int]             # the network's input (classifiers) or patch size (segmenters)
    class_names: list[str]
    label_values: list[int] | None = None   # segmentation: raw mask values in class order
    preprocessing: InputPrep
    threshold: Threshold | None = None
    # issue 26: multi-label runs, one validation-chosen threshold per label (class name -> probability)
    label_thresholds: dict[str, float] | None = None
    # issue 26: regression runs, the prediction interval fitted on the validation residuals, and the training
    # targets' [mean, standard deviation]: the network's output is scaled by them (it learns standardised values)
    interval: PredictionInterval | None = None
    target_scale: list[float] | None = None
    calibration: Calibration | None = None
    recalibrated_on: dict[str, Any] | None = None   # the site sample a recalibrated copy was adapted to
    # issue 26: how the calibration was chosen (held-out log-loss of each candidate by cross-validation inside
    # the validation split, the one kept and its improvement over none); absent in older runs
    calibration_choice: dict[str, Any] | None = None
    dataset: str | None = None
    split_method: str = ""
    # True: patients read from the data, the split keeps each in one split; False: a per-image split (one patient
    # may appear in several splits); None: the source's own split, or a run written before this was recorded
    patients_known: bool | None = None
    positive_class: str | None = None   # binary: the positive class (class_names[1]), named by config or data
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
    # issue 25: the exported files and the SHA-256 of each, by the exporter's record key ("onnx", "onnx-int8",
    # "torchscript", or a new format's): a short lower-case name, since the exporter registry (run.exporters, above
    # this module) owns the names; a key no exporter asks for is never read
    exports: dict[ExportKey, ExportRecord] | None = None

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        return check_run_task(str(v)) if isinstance(v, str) else v  # not a string: pydantic's type error

    @field_validator("label_thresholds")
    @classmethod
    def _label_thresholds(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, t in (v or {}).items():
            if not (math.isfinite(t) and 0.0 <= t <= 1.0):
                raise ValueError(f"{name!r}: {t} is not a probability in [0, 1]")
        return v

    @field_validator("model_params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        _bounded_params(v, "")
        return v

    @field_validator("class_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_CLASSES:
            raise ValueError(f"{len(v)} class names, at most {MAX_CLASSES}")
        if any(not n.strip() or len(n) > 1000 for n in v):
            raise ValueError("a class name is empty or longer than 1000 characters")
        if len(set(v)) != len(v):
            raise ValueError("two classes have the same name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RunMeta":
        """What must agree across fields: classes, outputs and task; channels; sizes."""
        n, k, task = len(self.class_names), self.n_outputs, get_task(self.task)
        want = task.outputs_problem(n, k)
        if want:
            raise ValueError(f"class_names: a {task.name} run needs {want}; this one has {n} class name(s) and "
                             f"n_outputs {k}")
        if self.label_thresholds is not None and (not task.label_thresholds
                                                  or list(self.label_thresholds) != self.class_names):
            raise ValueError(f"label_thresholds: one per class name of a {task.title} run with per-label thresholds")
        if self.target_scale is not None and (not task.numeric or len(self.target_scale) != 2
                                              or not all(math.isfinite(v) for v in self.target_scale)
                                              or not 0 < self.target_scale[1] <= MAX_PARAM_FLOAT
                                              or abs(self.target_scale[0]) > MAX_PARAM_FLOAT):
            raise ValueError(f"target_scale: a numeric target's [mean, std > 0], finite; not {self.target_scale} "
                             f"in a {task.title} run")
        if self.interval is not None and not task.numeric:
            raise ValueError(f"interval: a prediction interval belongs to a numeric target, not a {task.title} run")
        if self.label_values is not None and len(self.label_values) != n:
            raise ValueError(f"label_values: {len(self.label_values)} values for {n} classes")
        prep = self.preprocessing
        for name in ("mean", "std"):
            got = len(getattr(prep, name))
            if got != self.in_channels:
                raise ValueError(f"preprocessing.{name}: {got} value(s) for in_channels {self.in_channels}")
        _check_shape(self.input_size, prep.spatial_dims, "input_size")
        # a dense (segmentation) run's input_size is its patch, not the prepared image's size
        if prep.size is not None and not task.dense and prep.size != self.input_size:
            raise ValueError(f"preprocessing.size {prep.size} is not the model's input_size {self.input_size}")
        return self

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
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise DataError(f"run.json is {size:,} bytes, over the limit of {MAX_META_BYTES:,}", path)
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except RecursionError:
            raise DataError(f"corrupt run.json (nested deeper than {MAX_DEPTH} levels)", path) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"corrupt run.json ({' '.join(str(e).split())[:120]})", path) from None
        if not isinstance(raw, dict):
            raise DataError("corrupt run.json (not an object)", path)
        if json_depth(raw) > MAX_DEPTH:
            raise DataError(f"corrupt run.json (nested deeper than {MAX_DEPTH} levels)", path)
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            made = raw.get("medlens_version", "an older medlens")
            made = made if isinstance(made, str) and re.fullmatch(r"[\w.+-]{1,40}", made) else "another medlens"
            shown = version if isinstance(version, int) and not isinstance(version, bool) else repr(str(version)[:20])
            raise MedlensError(f"run.json has schema version {shown} (written by medlens {made}); this medlens "
                               f"{__version__} reads version {SCHEMA_VERSION}: retrain the run, or open it with "
                               "the medlens that wrote it", path)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise DataError(f"invalid run.json ({validation_message(e)})", path) from None


def validation_message(e: ValidationError) -> str:
    """The first problem of a pydantic ``ValidationError`` as ``field.path: what is wrong`` (one line)."""
    errors = e.errors()
    first = errors[0]
    where = ".".join(str(x) for x in first["loc"])
    msg = re.sub(r"^(Value|Assertion) error, ", "", str(first["msg"]))
    if where:   # loc is empty for RunMeta's cross-field checks, whose message starts with the field
        msg = f"{where}: {msg}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return " ".join(msg.split())[:300] + more
