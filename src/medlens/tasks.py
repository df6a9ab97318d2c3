"""Task types as a registry: what each kind of target decides, in one object per task.

timm's pattern, as for models (``medlens.models.registry``): a task is one ``Task`` object registered by
name; the registry imports none of the code that uses it. Every layer asks the task instead of comparing
its name: ``get_task(meta.task).activation(logits)``, ``task.has_threshold``, ``task.n_outputs(k)``.

Two names meet here:

- the **run task** (``RunMeta.task``, ``ArrayDataset.task``): binary, multiclass, ordinal, multilabel,
  segmentation. The data decide it for classifiers (two classes are binary, a multi-hot CSV multilabel...).
- the **config task** (``ExperimentConfig.task``, ``Task.config_name``): what a config may name;
  ``classification`` selects whichever of binary/multiclass/ordinal/multilabel the data give,
  ``segmentation`` and ``anomaly`` select themselves. Tasks selected by one config name must agree on
  the config-level rules (``dense``, ``flip_tta``, ``subgroups``): ``register_task`` checks it.

A new task type is one ``register_task(Task(...))`` (or a subclass overriding the methods whose default
does not fit), from any module: nothing else is edited. What the upper layers compute from a task that
this layer cannot hold (the evaluation's metric functions) is looked up there by ``Task.metrics``, a name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.functional as tmf

from medlens.errors import ConfigError


class TaskType(StrEnum):
    """The built-in run task names (plain strings on disk); ``get_task`` knows every registered one."""

    BINARY = "binary"
    MULTICLASS = "multiclass"
    ORDINAL = "ordinal"        # multi-class with ordered grades (QWK, MAE reported)
    MULTILABEL = "multilabel"
    SEGMENTATION = "segmentation"

    @property
    def is_classification(self) -> bool:
        return not get_task(self.value).dense


CLASSIFIER_MONITORS = ("val_auc", "val_acc", "val_loss", "val_qwk")


@dataclass(frozen=True)
class Task:
    """One task type. The defaults describe exclusive classes (one class per case, softmax, argmax):
    multi-class; the subclasses below override what differs."""

    name: str
    title: str = ""                       # for messages: "multi-class", "multi-label"...
    config_name: str = "classification"   # the config ``task:`` value that selects it
    records_runs: bool = True             # a run.json may carry it (anomaly runs record ``binary``)
    exclusive: bool = True                # exactly one class per case: argmax, class balancing, label_map
    ordered: bool = False                 # ordered grades: QWK monitored, MAE reported, kept by a monotone label_map
    has_threshold: bool = False           # a decision threshold chosen on validation (the binary operating point)
    dense: bool = False                   # one output per voxel (image + mask pairs, sliding windows)
    metrics: str | None = "multiclass"    # the evaluation's metric family (``medlens.evaluation.metrics``)
    calibrations: tuple[str, ...] = ("temperature",)  # the scalings that fit, the first is ``auto``'s
    monitor: str = "val_auc"              # what training monitors by default
    monitors: tuple[str, ...] = CLASSIFIER_MONITORS   # what ``train.monitor`` may name
    # what DICOM SR / FHIR encode: one_of (one class present per case), any_of (each label present or
    # absent), segments (one volumetric group per segment)
    coding: Literal["one_of", "any_of", "segments", "measurement"] = "one_of"
    # how an exported graph's logits become probabilities (``medlens.activation`` in the exported file):
    # softmax, sigmoid (one logit: P(class 1)), sigmoid_each (independent), segmentation (per voxel)
    export_activation: str = "softmax"
    # config-level rules, shared by every task of one config_name
    flip_tta: bool = True                 # evaluation.tta averages over the training flips: they must exist
    subgroups: bool = True                # evaluation.subgroups applies (columns of a CSV manifest)
    # issue 26: one decision threshold per label, each chosen on validation by evaluation.threshold
    # (``RunMeta.label_thresholds``; independent labels)
    label_thresholds: bool = False
    # issue 26: a numeric target (one value per case, no classes): a split-conformal prediction interval from the
    # validation residuals (``RunMeta.interval``); the config names the target column (``data.target_column``)
    numeric: bool = False
    train_metric: str = "acc"             # what ``batch_accuracy`` measures, logged as ``train_<it>`` beside ``val_<it>``

    # ---------- outputs ----------
    def same_outputs(self, names: Iterable[str], other: "str | Task", other_names: Iterable[str]) -> bool:
        """Whether ``other``'s outputs over ``other_names`` mean what this task's outputs over ``names`` mean: the
        same task type over the same classes in the same order. Two runs compared case by case, datasets pooled
        into cross-validation folds and a shadow version of a run must share it."""
        return get_task(other).name == self.name and list(names) == list(other_names)

    def n_outputs(self, n_classes: int) -> int:
        """Width of the model's output for ``n_classes`` classes (labels, segments)."""
        return n_classes

    def one_score(self, n_classes: int) -> bool:
        """Whether the probabilities are one score per case (the positive class's: one output over
        exclusive classes) rather than (N, K)."""
        return self.exclusive and self.n_outputs(n_classes) == 1

    def output_shape(self, n_outputs: int, input_size: tuple[int, ...]) -> tuple[int, ...]:
        """One item's model output shape (no batch axis): (n_outputs,), or (n_outputs, *input_size) when dense."""
        return (n_outputs, *input_size) if self.dense else (n_outputs,)

    def outputs_problem(self, n_classes: int, n_outputs: int) -> str | None:
        """Why ``n_classes`` class names and ``n_outputs`` outputs cannot be a run of this task, or None."""
        if n_classes >= 2 and n_outputs == n_classes:
            return None
        return "at least 2 class names, one per output"

    def activation(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Logits -> probabilities: (N,) positive-class probability for one output, (N, K) otherwise."""
        return torch.softmax(logits.float(), dim=1)

    # ---------- training ----------
    def loss(self, logits: "torch.Tensor", y: "torch.Tensor", class_weights: "torch.Tensor | None" = None,
             pos_weight: float | None = None, label_smoothing: float = 0.0) -> "torch.Tensor":
        return F.cross_entropy(logits.float(), y.long(), weight=class_weights, label_smoothing=label_smoothing)

    def loss_weights(self, counts: np.ndarray) -> tuple[Any, float | None]:
        """(class weights, positive weight) for ``train.imbalance: weighted_loss`` from the training counts."""
        counts = np.asarray(counts, float)
        w = counts.sum() / (len(counts) * np.maximum(counts, 1))
        return torch.tensor(w, dtype=torch.float32), None

    def batch_accuracy(self, prob: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        """Accuracy at 0.5 / argmax of probabilities ``prob`` (Keras's ``acc``)."""
        return (prob.argmax(1) == y.reshape(-1).long()).float().mean()

    def validation_scores(self, prob: "torch.Tensor", y: "torch.Tensor") -> dict[str, Any]:
        """What training monitors (torchmetrics), before the conversion to floats."""
        k = prob.shape[1]
        y = y.long().reshape(-1)
        out = {"val_auc": tmf.auroc(prob, y, task="multiclass", num_classes=k, average="macro"),
               "val_acc": tmf.accuracy(prob, y, task="multiclass", num_classes=k, average="micro")}
        if self.ordered:
            out["val_qwk"] = tmf.cohen_kappa(prob.argmax(1), y, task="multiclass", num_classes=k, weights="quadratic")
        return out

    # ---------- labels ----------
    def prepare_labels(self, labels: np.ndarray, n: int) -> np.ndarray:
        """The labels of ``n`` cases in this task's dtype and shape: (N,) class indices here."""
        return np.asarray(labels).reshape(n).astype(np.int64)

    def class_counts(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        return np.bincount(labels, minlength=max(n_classes, 2))

    def imbalance(self, counts: np.ndarray, n: int) -> float:
        """The largest class over the smallest (at least 1)."""
        counts = np.asarray(counts, dtype=float)
        return float(counts.max() / max(counts.min(), 1))

    # ---------- decisions ----------
    def hard_predictions(self, probs: np.ndarray, threshold: "float | np.ndarray | None" = None) -> np.ndarray:
        """The predicted class index per case."""
        return np.asarray(probs).argmax(1)

    def decide(self, probs: np.ndarray, names: list[str],
               threshold: "float | np.ndarray | None" = None) -> list[tuple[str, float]]:
        """(predicted class name, its probability) per case."""
        return [(names[int(np.argmax(p))], float(np.max(p))) for p in probs]

    def class_probabilities(self, p: np.ndarray, names: list[str]) -> dict[str, float]:
        """Every class's probability for one case's output ``p``."""
        return dict(zip(names, map(float, p)))

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """One score per case for distribution checks (the top-class probability here)."""
        return np.asarray(probs).max(1)

    def confidence_name(self, names: list[str]) -> str:
        return "top-class probability"

    def calibration_method(self, setting: str) -> str | None:
        """The scaling a run gets for ``evaluation.calibration``: ``auto`` is the task's first fitting one."""
        if setting == "none" or not self.calibrations:
            return None
        if setting == "auto":
            return self.calibrations[0]
        if setting not in self.calibration_names():
            raise ConfigError(f"evaluation.calibration '{setting}' does not fit a {self.name} run "
                              "(platt: binary; temperature: binary, multi-class or ordinal; isotonic: binary)")
        return setting

    def calibration_names(self) -> tuple[str, ...]:
        """The scalings ``evaluation.calibration`` may name (``auto`` chooses among the same): the task's own, plus
        temperature and isotonic where a case has one score (binary)."""
        extra = ("temperature", "isotonic") if self.calibrations and self.one_score(2) else ()
        return tuple(dict.fromkeys((*self.calibrations, *extra)))

    # ---------- predictions.csv ----------
    def prediction_columns(self, labels: np.ndarray, prob: np.ndarray, threshold: "float | np.ndarray | None",
                           names: list[str]) -> dict[str, np.ndarray]:
        """The label, probability and decision columns of ``predictions.csv``."""
        cols = {"label": labels}
        for j in range(prob.shape[1]):
            cols[f"prob_{j}"] = prob[:, j]
        cols["pred"] = prob.argmax(1)
        return cols

    def read_probabilities(self, df, names: list[str]) -> np.ndarray:
        """The probabilities that ``prediction_columns`` wrote, back from a predictions frame."""
        return df[[f"prob_{j}" for j in range(len(names))]].to_numpy(float)


@dataclass(frozen=True)
class BinaryTask(Task):
    """Two classes, one logit (sigmoid), the positive class at index 1, decided at a validation threshold."""

    title: str = "binary"
    has_threshold: bool = True
    metrics: str | None = "binary"
    calibrations: tuple[str, ...] = ("platt",)
    export_activation: str = "sigmoid"

    def n_outputs(self, n_classes: int) -> int:
        return 1

    def outputs_problem(self, n_classes: int, n_outputs: int) -> str | None:
        return None if n_classes == 2 and n_outputs == 1 else "exactly 2 class names and 1 output"

    def activation(self, logits):
        return torch.sigmoid(logits.float().reshape(-1))

    def loss(self, logits, y, class_weights=None, pos_weight=None, label_smoothing=0.0):
        pw = torch.tensor(pos_weight) if pos_weight else None
        target = y.float()
        if label_smoothing:
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), target, pos_weight=pw)

    def loss_weights(self, counts):
        counts = np.asarray(counts, float)
        return None, float(counts[0] / max(counts[1], 1))

    def batch_accuracy(self, prob, y):
        return ((prob >= 0.5).long() == y.reshape(-1).long()).float().mean()

    def validation_scores(self, prob, y):
        y = y.long().reshape(-1)
        auc = tmf.auroc(prob, y, task="binary") if 0 < int(y.sum()) < len(y) else torch.tensor(0.0)
        return {"val_auc": auc, "val_acc": tmf.accuracy(prob, y, task="binary", threshold=0.5)}

    def hard_predictions(self, probs, threshold=None):
        return (np.asarray(probs) >= (0.5 if threshold is None else threshold)).astype(int)

    def decide(self, probs, names, threshold=None):
        t = 0.5 if threshold is None else threshold
        return [(names[int(p >= t)], float(p)) for p in probs]

    def class_probabilities(self, p, names):
        return {names[0]: float(1 - p), names[1]: float(p)}

    def confidence(self, probs):
        return np.asarray(probs)

    def confidence_name(self, names):
        return "probability of " + names[-1]

    def prediction_columns(self, labels, prob, threshold, names):
        return {"label": labels, "prob": prob, "pred": (prob >= threshold).astype(int)}

    def read_probabilities(self, df, names):
        return df["prob"].to_numpy(float)


@dataclass(frozen=True)
class MultilabelTask(Task):
    """Independent labels: one sigmoid per label, multi-hot float targets, each label decided at 0.5."""

    title: str = "multi-label"
    exclusive: bool = False
    metrics: str | None = "multilabel"
    calibrations: tuple[str, ...] = ()
    coding: Literal["one_of", "any_of", "segments", "measurement"] = "any_of"
    export_activation: str = "sigmoid_each"
    label_thresholds: bool = True

    def outputs_problem(self, n_classes, n_outputs):
        return None if n_classes >= 1 and n_outputs == n_classes else "one class name per output"

    def activation(self, logits):
        return torch.sigmoid(logits.float())

    def loss(self, logits, y, class_weights=None, pos_weight=None, label_smoothing=0.0):
        return F.binary_cross_entropy_with_logits(logits.float(), y.float())

    def loss_weights(self, counts):
        return None, None

    def batch_accuracy(self, prob, y):
        return ((prob >= 0.5).float() == y.float()).float().mean()

    def validation_scores(self, prob, y):
        n, y = prob.shape[1], y.long()
        return {"val_auc": tmf.auroc(prob, y, task="multilabel", num_labels=n, average="macro"),
                "val_acc": tmf.accuracy(prob, y, task="multilabel", num_labels=n, average="micro")}

    def prepare_labels(self, labels, n):
        return np.asarray(labels).reshape(n, -1).astype(np.float32)

    def class_counts(self, labels, n_classes):
        return labels.sum(0)

    def imbalance(self, counts, n):
        """The largest negatives-to-positives ratio over the labels."""
        counts = np.asarray(counts, dtype=float)
        return float(np.max((n - counts) / np.maximum(counts, 1)))

    def hard_predictions(self, probs, threshold=None):
        """Each label at its own threshold (``threshold``: one per label, or one for all; 0.5 without)."""
        return (np.asarray(probs) >= _per_label(threshold)).astype(int)

    def decide(self, probs, names, threshold=None):
        t = np.broadcast_to(_per_label(threshold), (len(names),))
        return [(", ".join(n for n, q, c in zip(names, p, t) if q >= c) or "none", float(p.max())) for p in probs]

    def prediction_columns(self, labels, prob, threshold, names):
        cols = {}
        pred = self.hard_predictions(prob, threshold)
        for j in range(len(names)):
            cols[f"label_{j}"] = labels[:, j].astype(int)
            cols[f"prob_{j}"] = prob[:, j]
            if threshold is not None:   # the decision at the label's validation threshold
                cols[f"pred_{j}"] = pred[:, j]
        return cols


def _per_label(threshold) -> np.ndarray:
    return np.asarray(0.5 if threshold is None else threshold, dtype=float)


@dataclass(frozen=True)
class RegressionTask(Task):
    """A numeric target (an age, a score, a volume): one output per case, used as it is (no activation), Huber
    or squared-error loss, MAE/RMSE/R² with CIs, no classes, thresholds or calibration; a split-conformal
    prediction interval from the validation residuals. ``class_names`` holds one name: the target column."""

    title: str = "regression"
    config_name: str = "regression"
    exclusive: bool = False
    numeric: bool = True
    metrics: str | None = "regression"
    calibrations: tuple[str, ...] = ()
    monitor: str = "val_loss"
    monitors: tuple[str, ...] = ("val_loss", "val_mae")
    train_metric: str = "mae"
    coding: Literal["one_of", "any_of", "segments", "measurement"] = "measurement"
    export_activation: str = "identity"
    subgroups: bool = False

    def n_outputs(self, n_classes):
        return 1

    def one_score(self, n_classes):
        return True

    def outputs_problem(self, n_classes, n_outputs):
        return None if n_classes == 1 and n_outputs == 1 else "exactly 1 target name and 1 output"

    def activation(self, logits):
        return logits.float().reshape(-1)

    def loss(self, logits, y, class_weights=None, pos_weight=None, label_smoothing=0.0):
        return F.mse_loss(logits.float().reshape(-1), y.float().reshape(-1))

    def loss_weights(self, counts):
        return None, None

    def batch_accuracy(self, prob, y):
        """No accuracy of a number: the training batch's mean absolute error (``train_mae`` beside ``val_mae``)."""
        return (prob.reshape(-1) - y.float().reshape(-1)).abs().mean()

    def validation_scores(self, prob, y):
        return {"val_mae": (prob.reshape(-1) - y.float().reshape(-1)).abs().mean()}

    def prepare_labels(self, labels, n):
        return np.asarray(labels, dtype=np.float32).reshape(n)

    def class_counts(self, labels, n_classes):
        return np.array([len(labels)])

    def imbalance(self, counts, n):
        return 1.0

    def hard_predictions(self, probs, threshold=None):
        return np.asarray(probs, float)

    def decide(self, probs, names, threshold=None):
        return [(f"{float(v):.4g}", float(v)) for v in np.asarray(probs, float).reshape(-1)]

    def class_probabilities(self, p, names):
        return {}

    def confidence(self, probs):
        return np.asarray(probs, float)

    def confidence_name(self, names):
        return "predicted " + names[0]

    def prediction_columns(self, labels, prob, threshold, names):
        return {"label": labels, "value": prob}

    def read_probabilities(self, df, names):
        return df["value"].to_numpy(float)


@dataclass(frozen=True)
class SegmentationTask(Task):
    """A class per voxel: image + mask pairs, patch training, sliding-window inference, Dice monitored."""

    title: str = "segmentation"
    config_name: str = "segmentation"
    dense: bool = True
    metrics: str | None = None            # Dice, HD95...: medlens.evaluation.segmentation
    calibrations: tuple[str, ...] = ()
    monitor: str = "val_dice"
    monitors: tuple[str, ...] = ("val_dice",)
    coding: Literal["one_of", "any_of", "segments", "measurement"] = "segments"
    export_activation: str = "segmentation"
    flip_tta: bool = False                # segmentation.tta flips every axis itself
    subgroups: bool = False

    def n_outputs(self, n_classes):
        return 1 if n_classes == 2 else n_classes

    def outputs_problem(self, n_classes, n_outputs):
        if n_classes >= 2 and n_outputs == self.n_outputs(n_classes):
            return None
        return "at least 2 class names (background first), one output per class (1 for two classes)"

    def activation(self, logits):
        """(N, K, *spatial) class probabilities; one output channel is the foreground's sigmoid."""
        logits = logits.float()
        if logits.shape[1] == 1:
            p = torch.sigmoid(logits)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


_REGISTRY: dict[str, Task] = {}
_CONFIG_RULES = ("dense", "flip_tta", "subgroups")


def register_task(task: Task) -> Task:
    """Register ``task`` under ``task.name``; returns it. Tasks selected by one config name must agree on
    the config-level rules."""
    if task.name in _REGISTRY:
        raise ValueError(f"task '{task.name}' registered twice")
    for other in _REGISTRY.values():
        if other.config_name == task.config_name:
            differ = [r for r in _CONFIG_RULES if getattr(other, r) != getattr(task, r)]
            if differ:
                raise ValueError(f"task '{task.name}' and '{other.name}' are both selected by "
                                 f"'{task.config_name}' but differ in {differ}")
    _REGISTRY[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a registered task (tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def list_tasks() -> list[Task]:
    """Every registered task, in registration order."""
    return list(_REGISTRY.values())


def _unknown(what: str, name: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {what} '{name}'{hint}; expected one of {', '.join(known)}")


def get_task(name: "str | Task") -> Task:
    """The registered task of that name (a ``Task`` is returned as is); a ConfigError with "did you mean"."""
    if isinstance(name, Task):
        return name
    task = _REGISTRY.get(str(name))
    if task is None:
        raise _unknown("task", name, _REGISTRY)
    return task


def task_of(obj: Any) -> Task:
    """The task of a name, a ``Task`` or anything with a ``.task`` (a run, its meta, a dataset, splits)."""
    return get_task(obj if isinstance(obj, (str, Task)) else obj.task)


def config_task_names() -> list[str]:
    """What a config's ``task:`` may name, in registration order."""
    return list(dict.fromkeys(t.config_name for t in _REGISTRY.values()))


def config_task(name: str) -> Task:
    """A task selected by the config name ``name``, for the config-level rules its family shares."""
    for t in _REGISTRY.values():
        if t.config_name == name:
            return t
    raise _unknown("task", name, config_task_names())


def run_task_names() -> list[str]:
    """The task names a run folder (``run.json``) may record."""
    return [t.name for t in _REGISTRY.values() if t.records_runs]


def check_run_task(name: str) -> str:
    """``name`` if a run may record it; else a ValueError (pydantic turns it into a field error)."""
    if name not in run_task_names():
        raise ValueError(str(_unknown("task", name, run_task_names())))
    return name


BINARY_TASK = register_task(BinaryTask("binary"))
MULTICLASS_TASK = register_task(Task("multiclass", title="multi-class"))
ORDINAL_TASK = register_task(Task("ordinal", title="ordinal", ordered=True))
MULTILABEL_TASK = register_task(MultilabelTask("multilabel"))
SEGMENTATION_TASK = register_task(SegmentationTask("segmentation"))
# task: anomaly (issue 18): an autoencoder scores how far a case is from the normal class; the run it
# writes is a binary run (normal / abnormal at a validation threshold), so it records ``binary``
ANOMALY_TASK = register_task(BinaryTask("anomaly", title="anomaly detection", config_name="anomaly",
                                        records_runs=False, flip_tta=False, subgroups=False))
# issue 26: a numeric target of a CSV manifest (``task: regression``, ``data.target_column``)
REGRESSION_TASK = register_task(RegressionTask("regression"))

CLASSIFICATION_TASKS = tuple(t for t in TaskType if t.is_classification)
