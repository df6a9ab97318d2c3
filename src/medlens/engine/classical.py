"""The traditional baseline: hand-made features (first-order, GLCM texture, HOG) + random forest or SVM.

It is a model type of the same ``train`` / ``evaluate`` / report path: configs name
``random_forest`` or ``svm`` and the run folder holds ``model.skops`` (scikit-learn persisted with
skops, loaded with an explicit trust list, never unpickled blindly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSICAL_MODELS = {
    "random_forest": "Random forest (300 trees) on first-order, GLCM and HOG features: the traditional baseline.",
    "svm": "RBF support-vector machine on standardised first-order, GLCM and HOG features.",
}


def image_features(img: np.ndarray) -> np.ndarray:
    """Feature vector of one image (C, *spatial) in [0, 1]."""
    from skimage.feature import hog

    from medlens.imaging.features import first_order, glcm

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


def dataset_features(ds, batch: int = 512) -> np.ndarray:
    out = []
    for i in range(0, len(ds), batch):
        x, _ = ds.batch(np.arange(i, min(i + batch, len(ds))))
        out += [image_features(im) for im in x.numpy()]
    return np.stack(out)


def fit_classical(name: str, X: np.ndarray, y: np.ndarray, seed: int, params: dict):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "random_forest":
        model = RandomForestClassifier(n_estimators=params.get("n_estimators", 300), n_jobs=-1, random_state=seed,
                                       class_weight=params.get("class_weight", "balanced"),
                                       min_samples_leaf=params.get("min_samples_leaf", 2))
    else:
        model = make_pipeline(StandardScaler(), SVC(C=params.get("C", 1.0), probability=True, random_state=seed,
                                                    class_weight=params.get("class_weight", "balanced")))
    return model.fit(X, y)


def save_model(model, path: Path) -> None:
    import skops.io as sio

    from medlens.utils import atomic_path

    with atomic_path(path) as tmp:
        sio.dump(model, tmp)


def load_model(path: Path):
    import skops.io as sio

    from medlens.errors import DataError

    if not path.exists():
        raise DataError("classical run has no model.skops", path)
    trusted = [t for t in sio.get_untrusted_types(file=str(path)) if t.startswith(("sklearn.", "numpy."))]
    return sio.load(str(path), trusted=trusted)


class ClassicalPredictor:
    """``predict(ds) -> probabilities`` in the same format as the torch predictor."""

    def __init__(self, run: Path, task: str) -> None:
        self.model = load_model(Path(run) / "model.skops")
        self.task = task

    def __call__(self, ds) -> np.ndarray:
        p = self.model.predict_proba(dataset_features(ds))
        return p[:, 1] if self.task == "binary" else p
