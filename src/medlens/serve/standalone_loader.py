"""Run a medlens ONNX export without medlens: numpy, onnxruntime and Pillow only.

Copy this one file next to an exported ``model.onnx`` (``medlens export RUN --format onnx``) and run

    python standalone_loader.py model.onnx image.png [image2.png ...]      # JSON lines out
    python standalone_loader.py model.onnx volume.npy                       # a (z, y, x) array

or from Python::

    from standalone_loader import ExportedModel
    m = ExportedModel("model.onnx")
    m.predict("image.png")   # {"prediction", "probability", "probabilities", "threshold", ...}

Everything it needs is read from the file's metadata (``metadata_props``, written by medlens): the input
preparation (colour mode, CT window as level/width, resize target, intensity scaling), the class names,
the activation, the validation-chosen threshold and calibration. It mirrors medlens's
``transforms.preprocess.prepare_input`` for the inputs it reads (PNG/JPEG/TIFF through Pillow, NumPy
``.npy`` arrays); medlens resizes with OpenCV, this file with Pillow, so an image that must be resized
can differ slightly from medlens's preparation (images already at the model's size are prepared
identically). CLAHE and 3D resizing need medlens (OpenCV / SciPy) and are refused here. Segmentation
exports are run per window: ``ExportedModel.logits`` takes prepared (N, C, *patch) windows.

Given the run folder (``ExportedModel("model.onnx", run="RUN")`` or ``--run RUN``), the file is checked
against it: its SHA-256 must be the one ``medlens export`` recorded in the run's ``run.json``, and the graph's
input and output shapes must fit the run's channels, size, task and classes. Without it, the graph is checked
against its own metadata. Either way the metadata is read like any input: a threshold that is not a
probability, a calibration slope or temperature that is not positive, a CT window without a positive
width, or a resize target beyond the image limits is refused with an ``ExportError`` naming the key.

This file must not import medlens: a test runs it in a fresh interpreter where medlens is not importable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

__all__ = ["ExportError", "ExportedModel", "main"]



class TaskRule:
    """What a task means for this loader: its own small copy of ``medlens.tasks`` (this file runs without
    medlens). ``activation``: the one the file's metadata must name; ``min_classes``/``max_classes``: the class
    names it needs; ``one_score``: one output, P(second class), decided at the threshold (binary);
    ``independent``: each label decided at its threshold (``medlens.label_thresholds``, else 0.5; multi-label);
    ``numeric``: one output, the value itself (regression); ``dense``: one output per voxel. A plain class:
    this file is also loaded by path, outside ``sys.modules``, where dataclasses cannot resolve it."""

    def __init__(self, activation: str, min_classes: int = 2, max_classes: int | None = None,
                 one_score: bool = False, independent: bool = False, dense: bool = False,
                 numeric: bool = False) -> None:
        self.activation, self.min_classes, self.max_classes = activation, min_classes, max_classes
        self.one_score, self.independent, self.dense, self.numeric = one_score, independent, dense, numeric

    def n_outputs(self, n_classes: int) -> int:
        return 1 if self.one_score or self.numeric or (self.dense and n_classes == 2) else n_classes


TASKS = {"binary": TaskRule("sigmoid", max_classes=2, one_score=True),
         "multiclass": TaskRule("softmax"),
         "ordinal": TaskRule("softmax"),
         "multilabel": TaskRule("sigmoid_each", min_classes=1, independent=True),
         "segmentation": TaskRule("segmentation", dense=True),
         "regression": TaskRule("identity", min_classes=1, max_classes=1, numeric=True)}
MAX_AXIS = 8192
# the image limits of medlens (``medlens.io.limits``): the same settings, the same defaults
MAX_PIXELS = ("MEDLENS_MAX_PIXELS", 2 ** 26)
MAX_VOXELS = ("MEDLENS_MAX_VOXELS", 2 ** 28)
MAX_RUN_JSON_BYTES = 64 * 1024 * 1024


class ExportError(ValueError):
    """An input this loader cannot prepare, or a file that is not a medlens export."""


def _limit(setting: tuple[str, int]) -> int:
    raw = os.environ.get(setting[0], "").strip().replace("_", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else setting[1]


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ExportError(f"{what} is {v!r}, not a finite number")
    return float(v)


def _check_knots(knots) -> None:
    """An isotonic calibration's knots: [[p...], [p'...]], 2 to 256 finite probabilities each, p strictly and p'
    weakly increasing (as medlens.run.meta.Calibration checks them)."""
    ok = (isinstance(knots, list) and len(knots) == 2 and all(isinstance(k, list) for k in knots)
          and len(knots[0]) == len(knots[1]) and 2 <= len(knots[0]) <= 256
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for k in knots for v in k))
    if ok:
        x, y = np.asarray(knots[0], np.float64), np.asarray(knots[1], np.float64)
        ok = bool(np.isfinite(x).all() and np.isfinite(y).all() and x.min() >= 0 and x.max() <= 1 and y.min() >= 0
                  and y.max() <= 1 and np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0))
    if not ok:
        raise ExportError("medlens.calibration: isotonic knots must be [[p...], [p'...]] of 2 to 256 increasing "
                          "probabilities")


def check_metadata(task, class_names, prep, threshold, calibration, activation, in_channels, input_size) -> None:
    """The checks medlens's ``RunMeta`` makes, for the values this loader uses (a small copy: no medlens here)."""
    if task not in TASKS:
        raise ExportError(f"medlens.task {task!r} is not one of {', '.join(TASKS)}")
    rule = TASKS[task]
    if activation != rule.activation:
        raise ExportError(f"medlens.activation {activation!r} does not fit a {task} model")
    if (not isinstance(class_names, list) or not all(isinstance(n, str) and n.strip() for n in class_names)
            or len(set(class_names)) != len(class_names)):
        raise ExportError("medlens.class_names must be a list of distinct, non-empty names")
    n = len(class_names)
    if n < rule.min_classes or (rule.max_classes is not None and n > rule.max_classes):
        need = (f"exactly {rule.min_classes}" if rule.max_classes == rule.min_classes else f"at least {rule.min_classes}")
        raise ExportError(f"medlens.class_names: a {task} model needs {need} class names, not {n}")
    if not isinstance(in_channels, int) or not 1 <= in_channels <= 1024:
        raise ExportError(f"medlens.in_channels {in_channels!r} is not a channel count")
    if threshold is not None:
        if not isinstance(threshold, dict):
            raise ExportError("medlens.threshold is not an object")
        t = _number(threshold.get("value"), "medlens.threshold value")
        if not 0.0 <= t <= 1.0:
            raise ExportError(f"medlens.threshold value {t} is not a probability in [0, 1]")
    if calibration is not None:
        if not isinstance(calibration, dict) or not isinstance(calibration.get("params"), dict):
            raise ExportError("medlens.calibration is not an object with params")
        method, params = calibration.get("method"), calibration["params"]
        want = ({"platt": ("a", "b"), "temperature": ("t",), "isotonic": ()}.get(method)
                if isinstance(method, str) else None)
        if want is None or sorted(params) != sorted(want):
            raise ExportError(f"medlens.calibration: method {method!r} with params {sorted(params)} (platt takes a "
                              "and b, temperature takes t, isotonic takes knots)")
        if method == "isotonic":
            _check_knots(calibration.get("knots"))
        for k in want:
            _number(params[k], f"medlens.calibration {k}")
        if method == "platt" and not 0 < params["a"] <= 1e6 or method == "platt" and abs(params["b"]) > 1e6:
            raise ExportError(f"medlens.calibration slope a is {params['a']} (b {params['b']}): a must be > 0, "
                              "a and |b| at most 1e6")
        if method == "temperature" and not 1e-3 <= params["t"] <= 1e3:
            raise ExportError(f"medlens.calibration temperature t is {params['t']}: it must be between 0.001 and 1000")
    if not isinstance(prep, dict) or prep.get("spatial_dims") not in (2, 3):
        raise ExportError("medlens.preprocessing must give spatial_dims 2 or 3")
    dims = prep["spatial_dims"]
    if prep.get("color", "gray") not in ("gray", "rgb", "green"):
        raise ExportError(f"medlens.preprocessing color {prep.get('color')!r} is not gray, rgb or green")
    if prep.get("intensity", "unit") not in ("unit", "zscore", "percentile"):
        raise ExportError(f"medlens.preprocessing intensity {prep.get('intensity')!r} is not unit, zscore or percentile")
    if prep.get("window"):
        lw = prep.get("window_level_width")
        if not isinstance(lw, list) or len(lw) != 2:
            raise ExportError("medlens.preprocessing has a window but no window_level_width [level, width]")
        _number(lw[0], "medlens.preprocessing window level")
        if not _number(lw[1], "medlens.preprocessing window width") > 0:
            raise ExportError(f"medlens.preprocessing window width is {lw[1]}: it must be > 0")
    limit = _limit(MAX_PIXELS if dims == 2 else MAX_VOXELS)
    for key, size in (("medlens.preprocessing size", prep.get("size")), ("medlens.input_size", input_size)):
        if size is None and key != "medlens.input_size":
            continue
        if (not isinstance(size, list) or len(size) != dims
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_AXIS for v in size)):
            raise ExportError(f"{key} {size!r} must be {dims} whole numbers between 1 and {MAX_AXIS}")
        if math.prod(size) > limit:
            raise ExportError(f"{key} {size} = {math.prod(size):,} values, over the limit of {limit:,}")


def check_decision_extras(label_thresholds, interval, class_names) -> None:
    """Multi-label thresholds (one probability per class name) and a regression's prediction interval (finite
    half-width >= 0, coverage in (0, 1)), as ``RunMeta`` checks them."""
    if label_thresholds is not None:
        if not isinstance(label_thresholds, dict) or list(label_thresholds) != list(class_names):
            raise ExportError("medlens.label_thresholds must name each class once, in order")
        for k, v in label_thresholds.items():
            if not 0.0 <= _number(v, f"medlens.label_thresholds {k}") <= 1.0:
                raise ExportError(f"medlens.label_thresholds {k}: {v} is not a probability in [0, 1]")
    if interval is not None:
        if not isinstance(interval, dict):
            raise ExportError("medlens.interval is not an object")
        if _number(interval.get("half_width"), "medlens.interval half_width") < 0 or \
                not 0 < _number(interval.get("coverage"), "medlens.interval coverage") < 1:
            raise ExportError("medlens.interval: half_width must be >= 0 and coverage in (0, 1)")


def n_outputs(task: str, n_classes: int) -> int:
    return TASKS[task].n_outputs(n_classes)


def check_shapes(session, task: str, n_classes: int, in_channels: int, input_size: list[int]) -> None:
    """The graph's one float input (N, C, *size) and one output: (N, outputs), or (N, outputs, *size) for
    a segmenter; the batch axis is free."""
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(outs) != 1:
        raise ExportError(f"the graph has {len(ins)} input(s) and {len(outs)} output(s); a medlens export has one of each")
    k = n_outputs(task, n_classes)
    want_out = [k, *input_size] if TASKS[task].dense else [k]
    for what, arg, want in (("input", ins[0], [in_channels, *input_size]), ("output", outs[0], want_out)):
        shape = list(arg.shape)
        if arg.type != "tensor(float)" or len(shape) != len(want) + 1 or shape[1:] != want:
            raise ExportError(f"the graph's {what} is {arg.type} {shape}; the model needs tensor(float) "
                              f"[N, {', '.join(map(str, want))}]")


def read_run_json(run) -> dict:
    """The run's ``run.json`` (a run folder or the file itself), bounded in size and depth."""
    p = Path(run)
    p = p / "run.json" if p.is_dir() else p
    if not p.is_file():
        raise ExportError(f"{p}: no run.json")
    if p.stat().st_size > MAX_RUN_JSON_BYTES:
        raise ExportError(f"{p}: larger than {MAX_RUN_JSON_BYTES:,} bytes")
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ExportError(f"{p}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{p}: not JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{p}: not a medlens run.json")
    return meta


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


class ExportedModel:
    """An exported medlens model with its preparation, threshold and class names."""

    def __init__(self, path: str | Path, threads: int | None = None, run: str | Path | None = None) -> None:
        path = Path(path)
        data = path.read_bytes()
        run_meta = None
        if run is not None:   # bound to its run: the exact bytes medlens export wrote (SHA-256 in run.json)
            run_meta = read_run_json(run)
            recorded = {r.get("sha256") for k, r in (run_meta.get("exports") or {}).items()
                        if k in ("onnx", "onnx-int8") and isinstance(r, dict)}
            if hashlib.sha256(data).hexdigest() not in recorded:
                raise ExportError(f"{path.name}: its SHA-256 is not one the run's run.json records for its ONNX "
                                  "export: not the file medlens export wrote for this run")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own types for corrupt or foreign files
            raise ExportError(f"{path.name}: not a loadable ONNX file ({type(e).__name__})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("medlens.format") != "1":
            raise ExportError(f"{path}: not a medlens export (no medlens.format metadata)")
        self.metadata = meta
        try:
            self.task = meta["medlens.task"]
            self.class_names = json.loads(meta["medlens.class_names"])
            self.prep = json.loads(meta["medlens.preprocessing"])
            self.threshold = json.loads(meta.get("medlens.threshold", "null"))
            self.calibration = json.loads(meta.get("medlens.calibration", "null"))
            self.label_thresholds = json.loads(meta.get("medlens.label_thresholds", "null"))
            self.interval = json.loads(meta.get("medlens.interval", "null"))
            self.activation = meta["medlens.activation"]
            self.in_channels = int(meta["medlens.in_channels"])
            self.input_size = json.loads(meta["medlens.input_size"])
        except (KeyError, ValueError, RecursionError) as e:
            raise ExportError(f"{path.name}: medlens metadata missing or not readable ({type(e).__name__}: "
                              f"{str(e)[:80]})") from None
        check_metadata(self.task, self.class_names, self.prep, self.threshold, self.calibration, self.activation,
                       self.in_channels, self.input_size)
        check_decision_extras(self.label_thresholds, self.interval, self.class_names)
        if run_meta is not None:
            for key, ours, theirs in (("task", self.task, run_meta.get("task")),
                                      ("class names", self.class_names, run_meta.get("class_names")),
                                      ("input channels", self.in_channels, run_meta.get("in_channels")),
                                      ("input size", self.input_size, run_meta.get("input_size"))):
                if ours != theirs:
                    raise ExportError(f"{path.name}: its {key} ({ours}) are not the run's ({theirs})")
        check_shapes(self.session, self.task, len(self.class_names), self.in_channels, self.input_size)
        self.input_name = self.session.get_inputs()[0].name

    # ---------------------------------------------------------------- preparation
    def _read(self, source) -> tuple[np.ndarray, bool]:
        """(array, is_rgb) of a path or an array, as medlens's readers give it."""
        if isinstance(source, np.ndarray):
            a = source
            return a, self.prep["spatial_dims"] == 2 and a.ndim == 3 and a.shape[-1] == 3
        p = Path(source)
        if p.suffix.lower() == ".npy":
            a = np.load(p, allow_pickle=False)
            return a, self.prep["spatial_dims"] == 2 and a.ndim == 3 and a.shape[-1] == 3
        with Image.open(p) as im:
            im.load()
            if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGB" if im.mode != "LA" else "L")
            a = np.asarray(im)
        if a.dtype == np.int32:
            a = a.astype(np.uint16) if a.min() >= 0 and a.max() < 65536 else a
        return a, a.ndim == 3

    @staticmethod
    def _unit(a: np.ndarray) -> np.ndarray:
        if a.dtype == np.uint8:
            return a.astype(np.float32) / 255.0
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)

    def _window(self, a: np.ndarray) -> np.ndarray:
        level, width = self.prep["window_level_width"]
        lo = level - width / 2.0
        return np.clip((a.astype(np.float32) - lo) / width, 0.0, 1.0)

    def prepare(self, source) -> np.ndarray:
        """Model input (C, *spatial) float32, as medlens prepares it."""
        a, rgb = self._read(source)
        prep, dims = self.prep, self.prep["spatial_dims"]
        if not np.isfinite(a).all():
            raise ExportError("the image holds non-finite values")
        spatial = a.ndim - (1 if rgb else 0)
        if spatial != dims:
            raise ExportError(f"the model takes {dims}D inputs, this is {spatial}D {a.shape}")
        if prep.get("clahe"):
            raise ExportError("this export uses CLAHE, which needs medlens (OpenCV) to prepare inputs")
        if dims == 2:
            color = prep["color"]
            if rgb:
                if color == "green":
                    a = a[..., 1:2]
                elif color == "gray":
                    g = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                    a = (np.round(g).astype(a.dtype) if a.dtype == np.uint8 else g)[..., None]
            else:
                a = np.repeat(a[..., None], 3, -1) if color == "rgb" else a[..., None]
            if prep.get("window"):
                a = self._window(a)
            size = prep.get("size")
            if size and tuple(a.shape[:2]) != tuple(size):
                a = self._resize2d(a, tuple(size))
            a = np.moveaxis(a, -1, 0)
        else:
            a = a if a.dtype == np.uint8 else a.astype(np.float32)
            if prep.get("window"):
                a = self._window(a)
            size = prep.get("size")
            if size and tuple(a.shape) != tuple(size):
                raise ExportError(f"volume {a.shape} is not the model's size {tuple(size)}; resizing volumes "
                                  "needs medlens")
            a = a[None]
        intensity = prep.get("intensity", "unit")
        if intensity == "zscore":
            a = np.stack([(c - c.astype(np.float32).mean()) / max(float(c.astype(np.float32).std()), 1e-8)
                          for c in a.astype(np.float32)])
        elif intensity == "percentile":
            out = []
            for c in a.astype(np.float32):
                lo, hi = np.percentile(c, (1.0, 99.0))
                out.append(np.clip((c - lo) / max(hi - lo, 1e-8), 0, 1))
            a = np.stack(out)
        elif a.dtype != np.uint8 and not prep.get("window"):
            a = self._unit(a)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.shape[0] != self.in_channels:
            raise ExportError(f"the image gives {a.shape[0]} channel(s), the model takes {self.in_channels}")
        return np.ascontiguousarray(a)

    @staticmethod
    def _resize2d(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = size
        shrink = a.shape[0] > h
        chans = []
        for c in range(a.shape[-1]):
            ch = a[..., c]
            mode_arr = ch if ch.dtype == np.uint8 else ch.astype(np.float32)
            im = Image.fromarray(mode_arr)
            r = im.resize((w, h), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
            chans.append(np.asarray(r).astype(ch.dtype if ch.dtype == np.uint8 else np.float32))
        return np.stack(chans, -1)

    # ---------------------------------------------------------------- inference
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model output of prepared inputs (N, C, *spatial)."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        if not isinstance(out, np.ndarray):
            raise ExportError(f"the model's first output is a {type(out).__name__}, not a tensor")
        return out

    def _finite(self, p: np.ndarray) -> np.ndarray:
        if not np.isfinite(p).all():   # after calibration: a NaN must never reach the threshold
            raise ExportError("the model gave non-finite probabilities for this input")
        return p

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(N,) P(positive class) for binary tasks, (N, K) otherwise; calibrated as the run is."""
        z = self.logits(x).astype(np.float64)
        act = self.activation
        if act == "sigmoid":
            p = _sigmoid(z.reshape(-1))
        elif act == "sigmoid_each":
            p = _sigmoid(z)
        elif act == "softmax":
            p = _softmax(z, 1)
        elif act == "identity":   # a numeric target: the output is the value
            return self._finite(z.reshape(-1).astype(np.float32))
        else:
            raise ExportError("a segmentation export: run it per window with logits()")
        cal = self.calibration
        if cal:
            if cal["method"] == "isotonic":
                p = np.interp(p, cal["knots"][0], cal["knots"][1])
            elif cal["method"] == "platt" or p.ndim == 1:   # temperature on one binary score scales its logit
                q = np.clip(p, 1e-7, 1 - 1e-7)
                a, b = ((cal["params"]["a"], cal["params"]["b"]) if cal["method"] == "platt"
                        else (1.0 / cal["params"]["t"], 0.0))
                p = _sigmoid(a * np.log(q / (1 - q)) + b)
            else:
                zz = np.log(np.clip(p, 1e-12, 1.0)) / cal["params"]["t"]
                p = _softmax(zz, -1)
        return self._finite(p.astype(np.float32))

    def decide(self, p) -> tuple[str, float]:
        names, rule = self.class_names, TASKS[self.task]
        if rule.one_score:
            t = self.threshold["value"] if self.threshold else 0.5
            return names[int(p >= t)], float(p)
        if rule.numeric:
            return f"{float(p):.4g}", float(p)
        if rule.independent:
            lt = self.label_thresholds or {}
            return ", ".join(n for n, q in zip(names, p) if q >= float(lt.get(n, 0.5))) or "none", float(np.max(p))
        return names[int(np.argmax(p))], float(np.max(p))

    def predict(self, source) -> dict:
        """The model's answer for one image file or array."""
        p = self.probabilities(self.prepare(source)[None])[0]
        cls, prob = self.decide(p)
        if TASKS[self.task].numeric:
            hw = float(self.interval["half_width"]) if self.interval else None
            return {"prediction": cls, "value": prob, "lower": None if hw is None else prob - hw,
                    "upper": None if hw is None else prob + hw,
                    "interval_coverage": self.interval["coverage"] if self.interval else None}
        one_score = TASKS[self.task].one_score
        every = ({self.class_names[0]: float(1 - p), self.class_names[1]: float(p)} if one_score
                 else dict(zip(self.class_names, map(float, p))))
        out = {"prediction": cls, "probability": prob, "probabilities": every}
        if one_score:
            out["threshold"] = self.threshold["value"] if self.threshold else 0.5
        return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run, bad = None, False
    if "--run" in argv:   # --run RUN_FOLDER: check the file against the run it was exported from
        i = argv.index("--run")
        run = argv[i + 1] if i + 1 < len(argv) else None
        bad = run is None
        del argv[i:i + 2]
    if len(argv) < 2 or bad:
        print((__doc__ or "").strip().splitlines()[0] + "\nusage: standalone_loader.py MODEL.onnx IMAGE [IMAGE ...] "
              "[--run RUN_FOLDER]", file=sys.stderr)
        return 2
    try:
        model = ExportedModel(argv[0], run=run)
        for f in argv[1:]:
            print(json.dumps({"file": f, **model.predict(f)}))
    except ExportError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
