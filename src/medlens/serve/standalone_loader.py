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

This file must not import medlens: a test runs it in a fresh interpreter where medlens is not importable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["ExportedModel", "main"]


class ExportError(ValueError):
    """An input this loader cannot prepare, or a file that is not a medlens export."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


class ExportedModel:
    """An exported medlens model with its preparation, threshold and class names."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("medlens.format") != "1":
            raise ExportError(f"{path}: not a medlens export (no medlens.format metadata)")
        self.metadata = meta
        self.task = meta["medlens.task"]
        self.class_names = json.loads(meta["medlens.class_names"])
        self.prep = json.loads(meta["medlens.preprocessing"])
        self.threshold = json.loads(meta.get("medlens.threshold", "null"))
        self.calibration = json.loads(meta.get("medlens.calibration", "null"))
        self.activation = meta["medlens.activation"]
        self.in_channels = int(meta["medlens.in_channels"])
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
        from PIL import Image

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
        from PIL import Image

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
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

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
        else:
            raise ExportError("a segmentation export: run it per window with logits()")
        cal = self.calibration
        if cal:
            if cal["method"] == "platt":
                q = np.clip(p, 1e-7, 1 - 1e-7)
                p = _sigmoid(cal["params"]["a"] * np.log(q / (1 - q)) + cal["params"]["b"])
            else:
                zz = np.log(np.clip(p, 1e-12, 1.0)) / cal["params"]["t"]
                p = _softmax(zz, -1)
        return p.astype(np.float32)

    def decide(self, p) -> tuple[str, float]:
        names = self.class_names
        if self.task == "binary":
            t = self.threshold["value"] if self.threshold else 0.5
            return names[int(p >= t)], float(p)
        if self.task == "multilabel":
            return ", ".join(n for n, q in zip(names, p) if q >= 0.5) or "none", float(np.max(p))
        return names[int(np.argmax(p))], float(np.max(p))

    def predict(self, source) -> dict:
        """The model's answer for one image file or array."""
        p = self.probabilities(self.prepare(source)[None])[0]
        cls, prob = self.decide(p)
        every = ({self.class_names[0]: float(1 - p), self.class_names[1]: float(p)} if self.task == "binary"
                 else dict(zip(self.class_names, map(float, p))))
        out = {"prediction": cls, "probability": prob, "probabilities": every}
        if self.task == "binary":
            out["threshold"] = self.threshold["value"] if self.threshold else 0.5
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[0] + "\nusage: standalone_loader.py MODEL.onnx IMAGE [IMAGE ...]",
              file=sys.stderr)
        return 2
    model = ExportedModel(argv[0])
    for f in argv[1:]:
        print(json.dumps({"file": f, **model.predict(f)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
