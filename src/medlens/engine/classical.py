"""The traditional baseline: hand-made features (first-order, GLCM texture, HOG) + random forest or SVM.

It is a model type of the same ``train`` / ``evaluate`` / report path: configs name
``random_forest`` or ``svm`` and the run folder holds ``model.skops`` (scikit-learn persisted with
skops, loaded with an explicit trust list, never unpickled blindly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, cast

import numpy as np
from skimage.feature import hog
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from medlens.errors import DataError
from medlens.imaging.features import first_order, glcm
from medlens.utils import atomic_path

class ClassicalModel(Protocol):
    """What ``model.skops`` holds (the forest, or the scaler + SVM pipeline), as the run uses it."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


CLASSICAL_MODELS = {
    "random_forest": "Random forest (300 trees) on first-order, GLCM and HOG features: the traditional baseline.",
    "svm": "RBF support-vector machine on standardised first-order, GLCM and HOG features.",
}


def image_features(img: np.ndarray) -> np.ndarray:
    """Feature vector of one image (C, *spatial) in [0, 1]."""
    a = img.mean(0)
    full = np.ones(a.shape, bool)
    fo = first_order(a, full)
    tex = glcm(a, None, levels=16)
    feats = [fo[k] for k in ("mean", "std", "median", "p10", "p90", "iqr", "skewness", "kurtosis", "entropy")]
    feats += list(tex.values())
    plane = a if a.ndim == 2 else a[a.shape[0] // 2]
    cell = max(4, plane.shape[0] // 4)
    feats += list(hog(plane, orientations=8, pixels_per_cell=(cell, cell), cells_per_block=(1, 1)))
    return np.nan_to_num(np.asarray(feats, np.float64))


def features_of(x: np.ndarray) -> np.ndarray:
    """Feature matrix of prepared inputs (N, C, *spatial) in [0, 1]."""
    return np.stack([image_features(im) for im in np.asarray(x)])


def dataset_features(ds, batch: int = 512) -> np.ndarray:
    return np.concatenate([features_of(ds.batch(np.arange(i, min(i + batch, len(ds))))[0].numpy())
                           for i in range(0, len(ds), batch)])


def fit_classical(name: str, X: np.ndarray, y: np.ndarray, seed: int, params: dict) -> ClassicalModel:
    if name == "random_forest":
        model = RandomForestClassifier(n_estimators=params.get("n_estimators", 300), n_jobs=-1, random_state=seed,
                                       class_weight=params.get("class_weight", "balanced"),
                                       min_samples_leaf=params.get("min_samples_leaf", 2))
    else:
        # sklearn 1.9 deprecates SVC(probability=True) (its default is now the string "deprecated", hence the
        # ignore); it still gives the Platt-scaled predict_proba the saved model.skops relies on
        svc = SVC(C=params.get("C", 1.0), random_state=seed, class_weight=params.get("class_weight", "balanced"),
                  probability=True)  # pyright: ignore[reportArgumentType]
        model = make_pipeline(StandardScaler(), svc)
    return cast(ClassicalModel, model.fit(X, y))


def _skops():
    """``skops.io``, imported here and only here, when a classical model file is written or read: importing it
    walks and imports every scikit-learn module (to list the estimators it trusts), a third of the start-up of
    every process that imports ``medlens.run`` or ``medlens.engine.train`` (measured: 5 s of 14 s), though only
    classical runs use it. The one import outside ``medlens/cli`` not at its module's top (docs/ARCHITECTURE.md,
    "Imports")."""
    import skops.io  # noqa: PLC0415

    return skops.io


def save_model(model: ClassicalModel, path: Path) -> None:
    with atomic_path(path) as tmp:
        _skops().dump(model, tmp)


#: The exact types beyond skops' own safe defaults that a medlens classical model file may hold.
#: Anything else in a ``model.skops`` (a forged or foreign file) is refused before it is loaded.
ALLOWED_TYPES = frozenset({"sklearn.tree._tree.Tree"})
#: What the loaded root object must be.
ROOT_TYPES = ("sklearn.ensemble._forest.RandomForestClassifier", "sklearn.pipeline.Pipeline")


def load_model(path: Path) -> ClassicalModel:
    """Load ``model.skops`` trusting only ``ALLOWED_TYPES``; refuse any other type in one line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("classical run has no model.skops", path)
    sio = _skops()
    try:
        untrusted = sio.get_untrusted_types(file=str(path))
    except Exception as e:  # not a zip, no schema, corrupt: skops raises several types
        raise DataError(f"not a readable skops model file ({type(e).__name__})", path) from None
    refused = sorted(set(untrusted) - ALLOWED_TYPES)
    if refused:
        raise DataError(f"refusing to load: the model file holds type(s) medlens never writes: {', '.join(refused)}",
                        path)
    model = sio.load(str(path), trusted=sorted(set(untrusted)))
    root = f"{type(model).__module__}.{type(model).__qualname__}"
    if root not in ROOT_TYPES:
        raise DataError(f"refusing the model file: its root object is {root}, not a medlens classical model", path)
    return cast(ClassicalModel, model)   # one of ROOT_TYPES, checked by name just above
