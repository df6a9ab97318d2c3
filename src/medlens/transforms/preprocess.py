"""Turn an ``Image`` into a model input array: colour mode, window, CLAHE, intensity scaling, size.

This is the single input-preparation path of medlens. Training data (folders, CSV manifests,
segmentation pairs) and prediction (``medlens.run.Predictor``: files, arrays, DICOM) both call
``prepare_input`` with the run's ``InputSpec``, so a served input is prepared exactly as a trained one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy.ndimage import zoom

from medlens import __version__
from medlens.data import build_data
from medlens.data.segmentation import load_segmentation
from medlens.data.sources import get_source
from medlens.errors import DataError, ShapeError
from medlens.io.image import Image
from medlens.io.windows import apply_window, to_uint8
from medlens.transforms.intensity import clahe as _clahe, normalize

COLOR_MODES = ("gray", "rgb", "green")
PREP_VERSION = 1  # raise when prepare_raw/prepare_input change what they make: prepared stores are keyed by it


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """Scale to float32 [0, 1]: uint8 by 1/255, other types by their own min/max."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    a = arr.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError("image holds no finite values")
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def green_channel(rgb: np.ndarray) -> np.ndarray:
    """The green channel of an (..., 3) RGB array: the best vessel/lesion contrast in fundus photos."""
    if rgb.shape[-1] != 3:
        raise ShapeError(f"green channel needs an RGB image (..., 3), got {rgb.shape}")
    return rgb[..., 1]


def set_color(image: Image, color: str) -> np.ndarray:
    """Array (y, x, C) in the requested colour mode."""
    if color not in COLOR_MODES:
        raise DataError(f"unknown colour mode '{color}'; expected one of {COLOR_MODES}")
    arr = image.array
    if image.spatial_dims != 2:
        raise ShapeError(f"expected a 2D image, got {image.spatial_dims}D of shape {arr.shape}")
    if image.is_rgb:
        if color == "rgb":
            return arr
        if color == "green":
            return green_channel(arr)[..., None]
        w = np.array([0.299, 0.587, 0.114], np.float32)
        gray = arr.astype(np.float32) @ w
        return (np.round(gray).astype(arr.dtype) if arr.dtype == np.uint8 else gray)[..., None]
    if color == "rgb":
        return np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., None]  # gray or green of a gray image: the image itself


def resize2d(arr: np.ndarray, size: int | tuple[int, ...]) -> np.ndarray:
    """Resize (y, x, C) with area interpolation when shrinking, cubic when enlarging."""
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr
    interp = cv2.INTER_AREA if arr.shape[0] > h else cv2.INTER_CUBIC
    out = cv2.resize(arr, (w, h), interpolation=interp)
    return out if out.ndim == 3 else out[..., None]


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input; stored in the run (``RunMeta.preprocessing``).

    ``size``: the resize target of classifiers ((H, W) or (D, H, W)); ``None`` keeps the native grid
    (segmentation: sliding windows cover any size). ``window``: a CT window name or "level,width",
    applied to the raw values (HU) first. ``clahe``: 2D only. ``intensity``: ``unit`` ([0, 1]: uint8 / 255,
    windowed values as they are, other types by their own min/max), ``zscore`` or ``percentile``.
    """

    spatial_dims: int
    size: tuple[int, ...] | None = None
    color: str = "gray"
    clahe: bool = False
    window: str | None = None
    intensity: str = "unit"


def _check_finite(image: Image, name: str | None) -> None:
    a = image.array
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"{bad} non-finite (NaN/inf) value(s) in the image; refusing to predict on it", name)


def prepare_raw(image: Image, spec: InputSpec, name: str | None = None) -> np.ndarray:
    """(C, *spatial) before the final float scaling: uint8 where the source (or window/CLAHE) is 8-bit.

    Datasets store this (uint8 keeps memory small) and ``to_model_scale`` finishes it at batch time.
    """
    _check_finite(image, name)
    if image.spatial_dims != spec.spatial_dims:
        raise ShapeError(f"the model takes {spec.spatial_dims}D inputs, this is {image.spatial_dims}D "
                         f"{tuple(image.shape)}", name)
    if spec.spatial_dims == 2:
        arr = set_color(image, spec.color)  # (y, x, C)
        if spec.window:
            arr = apply_window(arr.astype(np.float32), spec.window)
        if spec.clahe:
            arr = np.stack([_clahe(arr[..., c] if arr.dtype == np.uint8 else to_uint8(arr[..., c]))
                            for c in range(arr.shape[-1])], -1)
        if spec.size is not None:
            arr = resize2d(arr, tuple(spec.size))
        arr = np.moveaxis(arr, -1, 0)
    else:
        if image.is_rgb:
            raise ShapeError("colour volumes are not supported; convert to one channel", name)
        arr = image.array if image.array.dtype == np.uint8 else image.array.astype(np.float32)
        if spec.window:
            arr = apply_window(arr, spec.window)
        if spec.size is not None and tuple(arr.shape) != tuple(spec.size):
            arr = np.asarray(zoom(arr.astype(np.float32) if arr.dtype != np.uint8 else arr,
                                  [t / s for t, s in zip(spec.size, arr.shape)], order=1))
        arr = arr[None]
    if spec.intensity != "unit":
        arr = np.stack([normalize(c, spec.intensity) for c in arr]).astype(np.float32)
    elif arr.dtype != np.uint8 and not spec.window:
        arr = to_unit_range(arr)
    return np.ascontiguousarray(arr)


def to_model_scale(arr: np.ndarray) -> np.ndarray:
    """uint8 -> float32 / 255; float arrays are already in the model's scale."""
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32, copy=False)


def prepare_input(image: Image, spec: InputSpec, name: str | None = None) -> np.ndarray:
    """Model input (C, *spatial) float32: the one preparation path for training and prediction."""
    return np.ascontiguousarray(to_model_scale(prepare_raw(image, spec, name)))


def display_image(image: Image, spec: InputSpec) -> np.ndarray:
    """uint8 picture of the image for overlays: (y, x) / (y, x, 3) in 2D, (z, y, x) in 3D."""
    if spec.spatial_dims == 2:
        arr = set_color(image, spec.color)
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        return arr if arr.dtype == np.uint8 else to_uint8(arr)
    arr = image.array.astype(np.float32)
    return to_uint8(apply_window(arr, spec.window) if spec.window else arr)


class Preparer:
    """An ``InputSpec`` as the callable that data loaders take (``medlens.data.base.Preparer``).

    ``store_root`` and ``workers`` (``data.store``, ``data.workers``) tell the prepared store (``medlens.data.store``)
    where its folder lies and how many processes build it; ``store_key`` is the preparation's identity there;
    ``store_log`` collects what each build did. Picklable: the store's worker processes each get a copy."""

    def __init__(self, spec: InputSpec, scale: bool = False, store_root: str | None = None,
                 workers: int | None = None) -> None:
        self.spec, self.scale = spec, scale
        self.store_root, self.workers = store_root, workers
        self.store_log: list = []
        # name -> (spatial shape, rgb, modality, body part examined)
        self.seen: dict[str, tuple[tuple[int, ...], bool, str, str | None]] = {}

    def __getstate__(self) -> dict:
        """What a worker process needs: the records (``seen``, ``store_log``) stay with this copy."""
        return {**self.__dict__, "seen": {}, "store_log": []}

    @property
    def store_key(self) -> str | None:
        """The preparation as text: spec, scaling, PREP_VERSION, medlens, OpenCV and NumPy versions."""
        return json.dumps({"spec": asdict(self.spec), "scale": self.scale, "prep": PREP_VERSION,
                           "medlens": __version__, "cv2": cv2.__version__, "numpy": np.__version__}, sort_keys=True)

    def __call__(self, image: Image, name: str | None = None) -> np.ndarray:
        if name is not None:  # what the source looked like, for the run's input profile
            self.seen[name] = (tuple(int(v) for v in image.shape[:image.spatial_dims]), bool(image.is_rgb),
                               image.modality, image.meta.get("BodyPartExamined"))
        return prepare_input(image, self.spec, name) if self.scale else prepare_raw(image, self.spec, name)

    def display(self, image: Image) -> np.ndarray:
        return display_image(image, self.spec)


def classifier_spec(cfg_data) -> InputSpec:
    """The preparation of a classification ``DataConfig``'s image files (resized to ``data.size``)."""
    return InputSpec(2, (cfg_data.size, cfg_data.size), cfg_data.color, cfg_data.clahe, cfg_data.window, "unit")


def segmentation_spec(cfg_data, spatial_dims: int) -> InputSpec:
    """The preparation of a segmentation ``DataConfig``'s images (native grid: sliding windows)."""
    return InputSpec(spatial_dims, None, cfg_data.color, cfg_data.clahe, cfg_data.window, cfg_data.intensity)


def prepared_data(cfg_data, seed: int = 0, progress=None):
    """``medlens.data.build_data`` with this module's preparation of image files: what training,
    evaluation and explanation all load, so they see the same tensors as ``Predictor.prepare``."""
    prep = Preparer(classifier_spec(cfg_data), store_root=getattr(cfg_data, "store", None),
                    workers=getattr(cfg_data, "workers", None))
    data = build_data(cfg_data, seed=seed, prepare=prep, progress=progress)
    if prep.seen:  # the training images as they were on disk (size, colour, modality): the run's input profile
        data.train.meta["raw_inputs"] = [prep.seen[s] for s in data.train.sources if s in prep.seen]
    return data


def prepare_store_for(cfg_data, seed: int = 0, workers: int | None = None, progress=None) -> list:
    """Build the prepared store of what ``prepared_data`` reads for ``cfg_data`` (``medlens data prepare``); the
    ``medlens.data.store.BuildResult`` of each pass (none for a source without image files)."""
    if workers is not None:
        cfg_data = cfg_data.model_copy(update={"workers": workers})
    prep = Preparer(classifier_spec(cfg_data), store_root=cfg_data.store, workers=cfg_data.workers)
    build_data(cfg_data, seed=seed, prepare=prep, progress=progress)
    return prep.store_log


class _SegPreparer(Preparer):
    """Segmentation cases mix 2D pictures and volumes by source; the spec follows each image."""

    def __init__(self, cfg_data) -> None:
        self.cfg = cfg_data
        super().__init__(segmentation_spec(cfg_data, 2), scale=True)

    @property
    def store_key(self) -> str | None:
        return None  # the spec follows each image: not one preparation the store could key

    volume_key = property(lambda self: Preparer(segmentation_spec(self.cfg, 3), scale=True).store_key)  # stored volumes

    def _for(self, image: Image) -> InputSpec:
        return segmentation_spec(self.cfg, image.spatial_dims)

    def __call__(self, image: Image, name: str | None = None) -> np.ndarray:
        return prepare_input(image, self._for(image), name)

    def display(self, image: Image) -> np.ndarray:
        return display_image(image, self._for(image))


def prepared_segmentation(cfg_data, seg_cfg, seed: int = 0, progress=None):
    """``medlens.data.segmentation.load_segmentation`` with this module's preparation."""
    rows = get_source(cfg_data.source).pair_rows(cfg_data)
    return load_segmentation(cfg_data, seg_cfg, _SegPreparer(cfg_data), rows, seed=seed, progress=progress)
