"""``Predictor``: the single path from an input (file, DICOM series folder, ``Image`` or array) to the
model's answer, for classifiers (probabilities and the decision at the validation threshold) and
segmenters (sliding-window class probabilities and the post-processed label map)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medlens.engine.classical import features_of
from medlens.engine.inference import postprocess, predict_probs
from medlens.errors import DataError, MedlensWarning, ShapeError
from medlens.io import load
from medlens.io.image import Image
from medlens.run.profile import check_input
from medlens.run.run import Run
from medlens.tasks import get_task
from medlens.transforms.augment import tta_flips
from medlens.transforms.preprocess import InputSpec, prepare_input


@dataclass
class Prediction:
    """A classifier's answer for one input."""

    source: str
    prediction: str
    probability: float
    probabilities: dict[str, float]
    threshold: float | None = None
    decision_rule: str = ""
    calibrated: str | None = None     # the calibration method when the probabilities are calibrated
    extra: dict = field(default_factory=dict)
    positive_class: str | None = None  # binary: the class ``probability`` is the probability of (index 1)
    # issue 26, numeric targets: the predicted value and its prediction interval (validation-fitted), in ``unit``
    value: float | None = None
    lower: float | None = None
    upper: float | None = None
    coverage: float | None = None
    unit: str | None = None
    label_thresholds: dict[str, float] | None = None   # multi-label: each label's validation threshold

    @property
    def predicted_probability(self) -> float:
        """The probability of the predicted class (``probability`` is that of the positive class when binary)."""
        return float(self.probabilities.get(self.prediction, self.probability))

    def as_dict(self) -> dict:
        d: dict = {"file": self.source, "prediction": self.prediction}
        d.update(self.answer_fields())
        if "input_warnings" in self.extra:
            d["input_warnings"] = list(self.extra["input_warnings"])
        return d

    def answer_fields(self) -> dict:
        """The answer without the file: a value with its interval (numeric targets), else the probabilities."""
        if self.value is not None:
            return {"value": self.value, "lower": self.lower, "upper": self.upper, "interval_coverage": self.coverage,
                    "unit": self.unit}
        d: dict = {"probability": self.probability, "probabilities": self.probabilities,
                   "calibrated": self.calibrated or "no"}
        if self.threshold is not None:
            d["threshold"] = self.threshold
        if self.label_thresholds is not None:
            d["label_thresholds"] = self.label_thresholds
        return d


class Predictor:
    """Prepare inputs exactly as the run was trained and run its model.

    ``tta`` overrides the run's test-time augmentation setting (``segmentation.tta``; for classifiers
    ``evaluation.tta``: the probabilities averaged over every combination of the flips training used).
    """

    def __init__(self, run: Run, tta: bool | None = None, batch_size: int = 256) -> None:
        self.run = run
        self.meta = run.meta
        self.spec: InputSpec = run.meta.preprocessing.spec()
        self.batch_size = batch_size
        cfg = run.config
        self.task = get_task(run.meta.task)
        segmenter = self.task.dense
        self.tta = (cfg.segmentation.tta if segmenter else cfg.evaluation.tta) if tta is None else tta
        self.flips: list[tuple[int, ...]] = [()]
        if self.tta and not segmenter and not run.is_classical:
            self.flips = tta_flips(cfg.train.augment, self.spec.spatial_dims)

    # ---------- input preparation: the one path ----------
    def load(self, source: str | Path | Image, name: str | None = None) -> Image:
        if isinstance(source, Image):
            return source
        img = load(source)
        if self.spec.spatial_dims == 2 and self.meta.preprocessing.pixel_spacing and img.spatial_dims == 2:
            img = img.with_array(img.array, spacing=np.array([self.meta.preprocessing.pixel_spacing] * 2))
        return img

    def prepare(self, source: str | Path | Image | np.ndarray, name: str | None = None) -> np.ndarray:
        """Model input (C, *spatial) float32 of one file, DICOM series folder, ``Image`` or raw array."""
        name = name or (str(source) if isinstance(source, (str, Path)) else None)
        if isinstance(source, np.ndarray):  # a raw array: (y, x), (y, x, 3) or (z, y, x), in the file's values
            rgb = self.spec.spatial_dims == 2 and source.ndim == 3 and source.shape[-1] == 3
            source = Image(source, is_rgb=rgb)
        x = prepare_input(self.load(source), self.spec, name)
        if x.shape[0] != self.meta.in_channels:
            raise ShapeError(f"the image gives {x.shape[0]} channel(s), the model takes {self.meta.in_channels}",
                             name)
        return x

    def input_warnings(self, image: Image, prepared: np.ndarray) -> list[str]:
        """Why an input falls outside the run's training input profile (modality, colour, size, intensity
        histogram); empty when it does not, or when the run records no profile."""
        profile = self.meta.input_profile
        if profile is None:
            return []
        return check_input(profile, prepared, image.modality, image.is_rgb,
                           tuple(int(v) for v in image.shape[:image.spatial_dims]), image.meta.get("BodyPartExamined"))

    # ---------- classification ----------
    @property
    def calibration(self) -> str | None:
        """The calibration method applied to probabilities (fitted on validation), or None."""
        return self.meta.calibration.method if self.meta.calibration else None

    def predict_arrays(self, x: np.ndarray | torch.Tensor, calibrated: bool = True) -> np.ndarray:
        """Probabilities of prepared inputs (N, C, *spatial): (N,) binary, (N, K) otherwise; calibrated
        with the run's validation-fitted calibration when it has one, unless ``calibrated=False``."""
        p = self._raw_probs(x)
        cal = self.meta.calibration
        if calibrated and cal is not None:
            p = cal.apply(p)
        # checked after calibration (issue 25): a NaN probability must never reach the threshold, where
        # "NaN >= t" is False and the input would be answered as the first class
        if not np.isfinite(p).all():
            what = f"after {cal.method} calibration" if calibrated and cal is not None else "from the model"
            raise DataError(f"non-finite probabilities {what}; the input, the weights or run.json's calibration "
                            "are unusable", self.run.dir)
        return p

    @torch.no_grad()
    def _raw_probs(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        if self.run.is_classical:
            p = self.run.estimator.predict_proba(features_of(np.asarray(x)))
            return p[:, 1] if self.task.one_score(len(self.meta.class_names)) else p  # binary: the positive class
        net = self.run.network
        x = torch.as_tensor(x)
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size]
            # flip TTA (evaluation.tta): the mean probability over the flips training used; [()] without it
            out.append(torch.stack([self.task.activation(net(xb.flip(f) if f else xb))
                                    for f in self.flips]).mean(0))
        probs = torch.cat(out).numpy()
        if not np.isfinite(probs).all():
            raise DataError("the model produced non-finite probabilities; the input or the weights are unusable",
                            self.run.dir)
        return probs

    def predict_dataset(self, ds, calibrated: bool = True) -> np.ndarray:
        """Probabilities for every sample of a dataset (``len``/``batch(idx)`` interface)."""
        out = [self.predict_arrays(ds.batch(np.arange(i, min(i + self.batch_size, len(ds))))[0], calibrated)
               for i in range(0, len(ds), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0,))

    def decide(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """(predicted class name, its probability) per row, at the run's validation threshold(s)."""
        return self.task.decide(probs, self.meta.class_names, self.thresholds())

    def thresholds(self) -> float | np.ndarray | None:
        """The decision threshold: binary, the validation one; multi-label, each label's (issue 26); else None."""
        if self.task.has_threshold:
            return self.binary_threshold()
        lt = self.meta.label_thresholds
        return np.array([lt[n] for n in self.meta.class_names]) if lt else None

    def value_fields(self, value: float) -> dict:
        """A numeric target's prediction with its validation-fitted interval (``Prediction`` fields; issue 26)."""
        iv = self.meta.interval
        return {"value": float(value), "lower": float(value) - iv.half_width if iv else None,
                "upper": float(value) + iv.half_width if iv else None, "coverage": iv.coverage if iv else None,
                "unit": self.run.config.data.target_unit}

    def binary_threshold(self) -> float:
        th = self.meta.threshold
        if th is None:
            warnings.warn(f"{self.run.dir}: the run records no validation threshold; deciding at 0.5",
                          MedlensWarning, stacklevel=2)
            return 0.5
        return th.value

    def predict_files(self, files: list[str | Path]) -> list[Prediction]:
        """Predict image files (or DICOM series folders) with the validation-chosen threshold.

        An input outside the training input profile is predicted all the same, with the reasons in
        ``Prediction.extra["input_warnings"]`` and a ``MedlensWarning`` naming the file."""
        xs, checks = [], []
        for f in files:
            image = self.load(f)
            x = self.prepare(image, name=str(f))
            xs.append(x)
            reasons = self.input_warnings(image, x)
            checks.append(reasons)
            if reasons:
                warnings.warn(f"{f}: outside the training inputs ({'; '.join(reasons)}): treat the prediction "
                              "with caution", MedlensWarning, stacklevel=2)
        xs = np.stack(xs)
        probs = self.predict_arrays(xs)
        rows = []
        for f, p, (cls, prob), reasons in zip(files, probs, self.decide(probs), checks):
            rows.append(self.prediction(str(f), p, cls, prob, reasons))
        return rows

    def prediction(self, source: str, p: np.ndarray, cls: str, prob: float, reasons: list[str] | None = None
                   ) -> Prediction:
        """One input's ``Prediction`` from its output ``p`` and decision ``(cls, prob)``."""
        names, task = self.meta.class_names, self.task
        th = self.binary_threshold() if task.has_threshold else None
        extra = {} if reasons is None else {"input_warnings": reasons}
        return Prediction(source, cls, prob, task.class_probabilities(p, names), th,
                          self.meta.threshold.rule if th is not None and self.meta.threshold else "",
                          self.calibration, extra=extra,
                          positive_class=names[1] if th is not None and len(names) == 2 else None,
                          label_thresholds=self.meta.label_thresholds,
                          **(self.value_fields(float(p)) if task.numeric else {}))

    # ---------- segmentation ----------
    def segment_probs(self, x: np.ndarray, name: str = "image") -> np.ndarray:
        """Class probabilities (K, *spatial) of a prepared image by sliding windows (and flip TTA)."""
        s = self.run.config.segmentation
        return predict_probs(self.run.network, x, self.meta.input_size, s.overlap, s.blend, s.sw_batch_size,
                             self.tta, name)

    def labels(self, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Post-processed label map: threshold (the run's, from validation) or argmax, then components."""
        s = self.run.config.segmentation
        t = threshold if threshold is not None else (self.meta.threshold.value if self.meta.threshold else 0.5)
        return postprocess(probs, t, s.largest_components, s.min_size)
