"""MedMNIST+ loader: official splits, task types, checksum verification, 2D and 3D, 28-224 px."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from medlens.data.base import ArrayDataset, SplitData
from medlens.data.catalog import MedMNISTInfo, get_info
from medlens.data.download import download, file_md5
from medlens.errors import DataError
from medlens.utils import data_dir, write_json_atomic

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


def medmnist_dir(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else data_dir() / "medmnist"


def medmnist_path(name: str, size: int = 28, root: str | Path | None = None) -> Path:
    info = get_info(name)
    _check_size(info, size)
    return medmnist_dir(root) / info.filename(size)


def _check_size(info: MedMNISTInfo, size: int) -> None:
    if size not in info.sizes:
        raise DataError(f"{info.name} is published at sizes {list(info.sizes)}, not {size}")


def _verified_cache() -> Path:
    return Path.home() / ".medlens" / "verified.json"


def verify(name: str, size: int = 28, root: str | Path | None = None) -> Path:
    """Check the file's MD5 against the official value; remember files that passed (by size and mtime)."""
    info = get_info(name)
    path = medmnist_path(name, size, root)
    if not path.exists():
        raise DataError(f"{info.name} ({size} px) is not downloaded; run `medlens data fetch {info.name} "
                        f"--size {size}` or set MEDLENS_DATA", path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    cache_file = _verified_cache()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if cache.get(key) == info.md5[size]:
        return path
    got = file_md5(path)
    if got != info.md5[size]:
        raise DataError(f"MD5 {got} does not match the official {info.md5[size]} of {info.filename(size)} "
                        "(corrupt, truncated or a different release)", path)
    cache[key] = got
    try:
        write_json_atomic(cache_file, cache)
    except OSError:
        pass
    return path


def fetch(name: str, size: int = 28, root: str | Path | None = None, progress=None) -> Path:
    """Download one MedMNIST file from the official Zenodo record, resuming and checking its MD5."""
    info = get_info(name)
    _check_size(info, size)
    return download(info.url(size), medmnist_path(name, size, root), info.md5[size], progress=progress)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a MedMNIST-layout npz, with a clear error for a missing, corrupt or wrongly keyed file."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in REQUIRED_KEYS if k not in keys]
            if missing:
                raise DataError(f"npz lacks the keys {missing} (has {sorted(keys)}); a MedMNIST file holds "
                                f"{list(REQUIRED_KEYS)}", path)
            return {k: z[k] for k in REQUIRED_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"not a readable .npz file ({type(e).__name__}: {e})", path) from e


def _channels_first(images: np.ndarray, info: MedMNISTInfo, path: Path) -> np.ndarray:
    n = images.shape[0]
    if info.dims == 3:
        if images.ndim == 4:
            return images[:, None]
        if images.ndim == 5 and images.shape[1] in (1, 3):
            return images
    else:
        if images.ndim == 3:
            return images[:, None]
        if images.ndim == 4 and images.shape[-1] in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"images of shape {images.shape} do not fit {info.name} ({info.dims}D, "
                    f"{info.n_channels} channel(s), {n} images)", path)


def load_medmnist(name: str, size: int = 28, root: str | Path | None = None, *,
                  check_md5: bool = True, path: str | Path | None = None) -> SplitData:
    """Load a MedMNIST dataset with its official train/val/test split.

    Args:
        name: dataset name, e.g. ``"pneumoniamnist"``.
        size: 28, 64, 128 or 224 (2D) / 28 or 64 (3D).
        root: folder holding the npz files (default ``$MEDLENS_DATA/medmnist``).
        check_md5: verify the file against the official MD5 (cached once verified).
        path: read this npz instead of the catalogue location (MD5 not checked).
    """
    info = get_info(name)
    if path is None:
        path = verify(name, size, root) if check_md5 else medmnist_path(name, size, root)
    path = Path(path)
    arrays = read_npz(path)
    out = {}
    for split in SPLITS:
        images = _channels_first(arrays[f"{split}_images"], info, path)
        labels = arrays[f"{split}_labels"]
        if len(labels) != len(images):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels", path)
        out[split] = ArrayDataset(images, labels, info.task, list(info.labels), name=f"{info.name}/{split}",
                                  meta={"dataset": info.name, "size": size, "file": str(path)})
    return SplitData(out["train"], out["val"], out["test"], split_method="official MedMNIST split")
