"""Inference from a run folder: load the weights-only model and predict datasets or files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medlens.engine.module import ClassifierNet, outputs_to_probs
from medlens.errors import DataError, MedlensError, ShapeError


def read_run_meta(run_dir: str | Path) -> dict:
    run = Path(run_dir)
    p = run / "run.json"
    if not run.is_dir():
        raise MedlensError("run folder not found", run)
    if not p.exists():
        raise MedlensError("not a medlens run folder (no run.json)", run)
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise DataError(f"corrupt run.json ({e})", p) from e


def load_run_model(run_dir: str | Path, expect: str | None = None) -> tuple[ClassifierNet, dict]:
    """Rebuild the network and load ``model.pt`` with ``weights_only=True``.

    ``expect`` ("classification" or "segmentation") refuses a run of the other kind with a clear error.
    """
    from medlens.engine.train import build_network

    run = Path(run_dir)
    meta = read_run_meta(run)
    is_seg = meta.get("task") == "segmentation"
    if expect == "segmentation" and not is_seg:
        raise MedlensError(f"not a segmentation run (its task is {meta.get('task')}); use `medlens predict`", run)
    if expect == "classification" and is_seg:
        raise MedlensError("a segmentation run; use `medlens segment` (explanations and predict are for "
                           "classifiers)", run)
    weights = run / "model.pt"
    if not weights.exists():
        raise MedlensError("run has no model.pt (training did not finish; `medlens train ... --resume`)", run)
    net = build_network(meta)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:
        raise DataError(f"cannot load weights ({type(e).__name__}: {str(e).splitlines()[0]})", weights) from e
    net.eval()
    return net, meta


@torch.no_grad()
def predict_tensor(net: torch.nn.Module, task: str, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    net.eval()
    out = [outputs_to_probs(task, net(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_dataset(net: torch.nn.Module, ds, batch_size: int = 256) -> np.ndarray:
    """Probabilities for every sample of an ``ArrayDataset``: (N,) binary, (N, K) otherwise."""
    net.eval()
    out = []
    for i in range(0, len(ds), batch_size):
        x, _ = ds.batch(np.arange(i, min(i + batch_size, len(ds))))
        out.append(outputs_to_probs(ds.task, net(x)))
    return torch.cat(out).numpy()


def prepare_file(path: str | Path, meta: dict) -> np.ndarray:
    """Load one image file and shape it as the run's model input (C, *spatial) float32 in [0, 1]."""
    from medlens.io import load
    from medlens.transforms.preprocess import prepare_2d

    img = load(path)
    size = tuple(meta["input_size"])
    if meta["spatial_dims"] == 2:
        if img.spatial_dims != 2:
            raise ShapeError(f"the model takes 2D images, this is {img.spatial_dims}D {img.shape}", path)
        arr = prepare_2d(img, size, meta.get("color", "gray"))
        if arr.shape[0] != meta["in_channels"]:
            raise ShapeError(f"image gives {arr.shape[0]} channel(s), the model takes {meta['in_channels']}", path)
    else:
        if img.spatial_dims != 3:
            raise ShapeError(f"the model takes 3D volumes, this is {img.spatial_dims}D {img.shape}", path)
        from scipy.ndimage import zoom

        from medlens.transforms.preprocess import to_unit_range

        a = to_unit_range(img.array) if img.array.dtype != np.uint8 else img.array.astype(np.float32) / 255
        arr = zoom(a, [t / s for t, s in zip(size, a.shape)], order=1)[None]
    return (arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32))


def predict_files(run_dir: str | Path, files: list[str | Path]) -> list[dict]:
    """Predict image files with a trained run; binary decisions use the validation-chosen threshold."""
    meta = read_run_meta(run_dir)
    thr = None
    mpath = Path(run_dir) / "metrics.json"
    if meta["task"] == "binary" and mpath.exists():
        thr = json.loads(mpath.read_text()).get("threshold", {}).get("value")
    xs = np.stack([prepare_file(f, meta) for f in files])
    if meta.get("kind") == "classical":
        from medlens.data.base import ArrayDataset
        from medlens.engine.classical import ClassicalPredictor

        ds = ArrayDataset(xs, np.zeros(len(xs), int), meta["task"], meta["class_names"], name="files")
        probs = ClassicalPredictor(Path(run_dir), meta["task"])(ds)
    else:
        net, meta = load_run_model(run_dir, expect="classification")
        probs = predict_tensor(net, meta["task"], torch.from_numpy(xs))
    names = meta["class_names"]
    rows = []
    for f, p in zip(files, probs):
        if meta["task"] == "binary":
            t = 0.5 if thr is None else thr
            cls = names[int(p >= t)]
            rows.append({"file": str(f), "prediction": cls, "probability": float(p), "threshold": t,
                         "probabilities": {names[0]: float(1 - p), names[1]: float(p)}})
        elif meta["task"] == "multilabel":
            rows.append({"file": str(f), "prediction": ", ".join(n for n, q in zip(names, p) if q >= 0.5) or "none",
                         "probability": float(p.max()), "probabilities": dict(zip(names, map(float, p)))})
        else:
            k = int(np.argmax(p))
            rows.append({"file": str(f), "prediction": names[k], "probability": float(p[k]),
                         "probabilities": dict(zip(names, map(float, p)))})
    return rows
