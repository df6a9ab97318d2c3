"""``medlens pretrain``: pool unlabelled training images, pretrain a backbone, write it with a JSON sidecar.

Only the **train** split of each source is read (validation and test images are never seen, so a later
fine-tuning's validation threshold and test metrics stay untouched); labels are ignored. Sources are pooled
at one size and one channel count (RGB -> gray by luminance, gray -> RGB by repetition). The backbone is
written as a state dict of tensors (``torch.save``, atomically) with the registered model's own names,
without its head, so an experiment config loads it through ``model.pretrained`` (``models.transfer``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medlens.config import DataConfig
from medlens.data.base import ArrayDataset, SplitData
from medlens.data.catalog import MEDMNIST, get_info
from medlens.data.medmnist import channels_first, image_dims, load_medmnist, read_npz
from medlens.engine.pretrain import METHODS, head_name, pretrain_backbone
from medlens.errors import ConfigError, DataError
from medlens.models import create_model
from medlens.transforms.preprocess import prepared_data
from medlens.utils import atomic_path, write_json_atomic

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Source:
    """One pooled source: its name as given, where it came from, and its training images (N, C, *spatial)."""

    name: str
    origin: str
    images: np.ndarray

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2


def _medmnist_name(path: Path) -> str | None:
    """The catalogue name of a MedMNIST file such as ``retinamnist_64.npz``, or None."""
    stem = path.stem.lower()
    base = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem
    key = base.replace("_", "").replace("-", "")
    return key if key in MEDMNIST else None


def _npz_train_images(path: Path) -> np.ndarray:
    """``train_images`` of a MedMNIST-layout npz as (N, C, *spatial): the catalogue's layout for a catalogue
    file, else the layout read from the array's shape (``data.medmnist``)."""
    x = read_npz(path)["train_images"]
    name = _medmnist_name(path)
    if name is not None:
        return channels_first(x, get_info(name).dims, path, f"{name} ({get_info(name).dims}D images)")
    return channels_first(x, image_dims(x), path)


def _train_images(data: SplitData, spec: str) -> np.ndarray:
    """The training split's images (N, C, *spatial) as stored (an in-memory dataset's array)."""
    if not isinstance(data.train, ArrayDataset):
        raise DataError(f"pretraining reads images held in memory, not a {type(data.train).__name__}", spec)
    return np.asarray(data.train.images)


def load_source(spec: str, size: int, seed: int = 0) -> Source:
    """The training images of a MedMNIST catalogue name (at ``size``), a MedMNIST-layout ``.npz`` file, or an
    image folder (``root/<class>/<image>``; its seeded training split, resized to ``size``, gray)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        data = prepared_data(DataConfig(source="folder", path=str(p), size=size, color="gray"), seed=seed)
        return Source(spec, f"folder {p} (train split)", _train_images(data, spec))
    if p.suffix == ".npz" or p.is_file():
        return Source(spec, str(p), _npz_train_images(p))

    data = load_medmnist(spec, size)
    return Source(spec, data.train.meta.get("file", spec), _train_images(data, spec))


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def conform(x: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Images (N, C, *spatial) -> float32 in the model's input scale with ``channels`` channels and every
    spatial side ``size`` (bilinear / trilinear, antialiased when shrinking 2D)."""
    x = _to_float(x)
    if x.shape[1] == 3 and channels == 1:
        x = np.tensordot(LUMA, x, axes=(0, 1))[:, None]
    elif x.shape[1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] != channels:
        raise DataError(f"images with {x.shape[1]} channels cannot be converted to {channels}")
    nd = x.ndim - 2
    if any(s != size for s in x.shape[2:]):
        t = torch.from_numpy(np.ascontiguousarray(x))
        mode = "bilinear" if nd == 2 else "trilinear"
        out = []
        for i in range(0, len(t), 1024):
            out.append(F.interpolate(t[i:i + 1024], size=(size,) * nd, mode=mode, align_corners=False,
                                     antialias=nd == 2))
        x = torch.cat(out).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def pool_sources(sources: list[Source], channels: int, size: int, max_per_source: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """All sources' images at one channel count and size; a seeded sample of ``max_per_source`` of each."""
    if not sources:
        raise DataError("no dataset given to pretrain on")
    dims = {s.name: s.spatial_dims for s in sources}
    if len(set(dims.values())) > 1:
        raise DataError(f"cannot pool 2D and 3D images in one backbone: {dims}; pretrain them separately")
    pooled, summary = [], []
    for s in sources:
        x = s.images
        if len(x) == 0:
            raise DataError("no training images", s.origin)
        if max_per_source and len(x) > max_per_source:
            rng = np.random.default_rng(seed)
            x = x[np.sort(rng.choice(len(x), max_per_source, replace=False))]
        pooled.append(conform(x, channels, size))
        summary.append({"name": s.name, "origin": s.origin, "split": "train", "n_images": int(len(x)),
                        "channels": int(s.images.shape[1]), "shape": list(s.images.shape[2:])})
    return np.concatenate(pooled), summary


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(out: str | Path) -> Path:
    """``backbone.pt`` -> ``backbone.json``."""
    return Path(out).with_suffix(".json")


def pretrain(datasets: list[str], *, method: str = "simclr", model: str = "small_cnn", params: dict | None = None,
             size: int = 28, channels: int | None = None, epochs: int = 10, batch_size: int = 256,
             lr: float = 1e-3, temperature: float = 0.2, mask_ratio: float = 0.6, patch: int = 4,
             seed: int = 0, max_per_dataset: int | None = None, precision: str = "bf16",
             out: str | Path = "backbone.pt", log: Callable[[str], None] = lambda s: None) -> dict:
    """Pretrain ``model`` on the pooled training images of ``datasets``; write ``out`` and its JSON sidecar.

    Returns the sidecar's content."""
    if method not in METHODS:
        raise ConfigError(f"unknown pretraining method '{method}'; choose one of {list(METHODS)}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {channels}")
    if precision not in ("bf16", "32"):
        raise ConfigError(f"precision must be 'bf16' or '32', got '{precision}'")
    if not datasets:
        raise DataError("no dataset given to pretrain on")
    params = dict(params or {})
    sources = [load_source(d, size, seed) for d in datasets]
    channels = channels or min(3, sources[0].images.shape[1])
    images, summary = pool_sources(sources, channels, size, max_per_dataset, seed)
    if len(images) < 2:
        raise DataError(f"only {len(images)} training image(s) in {datasets}; pretraining needs at least 2")
    nd = images.ndim - 2
    log(f"pretrain {method}: {len(images)} unlabelled training images of {', '.join(datasets)} "
        f"(train splits only; validation and test images are not used), {channels} channel(s), {size} px, {nd}D")
    torch.manual_seed(seed)
    net = create_model(model, channels, 2, nd, (size,) * nd, **params)
    head = head_name(net)  # a model without a Linear head fails here, before any work
    axes = (0,) + tuple(range(2, images.ndim))
    mean, std = images.mean(axis=axes).tolist(), images.std(axis=axes).tolist()
    x = torch.from_numpy(images)
    res = pretrain_backbone(net, x, method, mean=mean, std=std, epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, temperature=temperature, mask_ratio=mask_ratio, patch=patch,
                            bf16=precision == "bf16",
                            progress=lambda e, loss: log(f"epoch {e}/{epochs}: loss {loss:.4f}"))
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(res.backbone, tmp)
    meta = {
        "method": method, "datasets": summary, "splits_used": ["train"], "labels_used": False,
        "n_images": int(len(images)), "channels": channels, "size": size, "spatial_dims": nd,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": res.n_steps,
        "temperature": temperature if method == "simclr" else None,
        "mask_ratio": mask_ratio if method == "mae" else None, "patch": patch if method == "mae" else None,
        "precision": precision, "loss_curve": [round(v, 6) for v in res.losses], "seed": seed,
        "model": {"name": model, "params": params, "head_excluded": head},
        "n_tensors": len(res.backbone), "normalize": {"mean": mean, "std": std},
        "seconds": round(res.seconds, 2), "weights": out.name, "sha256": sha256_file(out),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(sidecar_path(out), meta)
    return meta


def read_sidecar(out: str | Path) -> dict:
    """The sidecar of a written backbone."""
    p = sidecar_path(out)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the pretraining sidecar ({type(e).__name__})", p) from e
