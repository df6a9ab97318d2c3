"""MedMNIST+ loader: official splits, task types, checksum verification, 2D and 3D, 28-224 px."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from medlens.data.base import ArrayDataset, SplitData
from medlens.data.catalog import BINARY, MULTICLASS, MULTILABEL, MedMNISTInfo, get_info
from medlens.data.download import download, file_md5
from medlens.errors import DataError
from medlens.io.limits import MAX_DECOMPRESSED_ENV, max_decompressed_bytes
from medlens.io.raster import npz_member_header
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


def read_npz(path: str | Path, limit: bool = True) -> dict[str, np.ndarray]:
    """Read a MedMNIST-layout npz, with a clear error for a missing, corrupt or wrongly keyed file.

    Every array's npy header is read first, before anything is allocated: its shape and dtype must fit the
    bytes the file holds (a header that declares 10^9 images is refused, not a MemoryError), images must be
    numbers and labels integers (or booleans). With ``limit`` (any file whose MD5 was not checked against the
    catalogue) the arrays together may expand to at most ``MEDLENS_MAX_DECOMPRESSED_BYTES``.
    """
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
            total = 0
            for k in REQUIRED_KEYS:
                _, dtype, nbytes = npz_member_header(z.zip, k, path)
                kinds = "biu" if k.endswith("_labels") else "biuf"
                if dtype.kind not in kinds:
                    want = "integer class indices" if k.endswith("_labels") else "numbers"
                    raise DataError(f"'{k}' holds {dtype} values; {want} expected", path)
                total += nbytes
            if limit and total > max_decompressed_bytes():
                raise DataError(f"its arrays expand to {total:,} bytes, over the limit of {max_decompressed_bytes():,} "
                                f"(raise {MAX_DECOMPRESSED_ENV} to allow it)", path)
            return {k: z[k] for k in REQUIRED_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"not a readable .npz file ({type(e).__name__}: {e})", path) from e


def image_dims(images: np.ndarray) -> int | None:
    """The spatial dimensions of a MedMNIST-format images array, read from its shape: 2 for ``(n, h, w)`` or
    ``(n, h, w, 1|3)``, 3 for ``(n, d, h, w)`` or ``(n, 1|3, d, h, w)``; None for any other shape."""
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] > 3):
        return 2
    if images.ndim == 4 or (images.ndim == 5 and images.shape[1] in (1, 3)):
        return 3
    return None


def channels_first(images: np.ndarray, dims: int | None, path: Path, what: str = "") -> np.ndarray:
    """MedMNIST-format images of ``dims`` spatial dimensions as ``(n, c, *spatial)``; a one-line DataError
    (naming ``what`` the file should hold) when the shape does not fit."""
    if dims == 3:
        if images.ndim == 4:
            return images[:, None]
        if images.ndim == 5 and images.shape[1] in (1, 3):
            return images
    elif dims == 2:
        if images.ndim == 3:
            return images[:, None]
        if images.ndim == 4 and images.shape[-1] in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    what = what or "a 2D (n, h, w[, c]) or 3D (n, d, h, w) image array"
    raise DataError(f"images of shape {images.shape} do not fit {what}", path)


def _channels_first(images: np.ndarray, info: MedMNISTInfo, path: Path) -> np.ndarray:
    return channels_first(images, info.dims, path,
                          f"{info.name} ({info.dims}D, {info.n_channels} channel(s), {images.shape[0]} images)")


def infer_info(arrays: dict[str, np.ndarray], path: Path, size: int | None = None) -> MedMNISTInfo:
    """What a MedMNIST-format file of a dataset outside the catalogue holds, read from its arrays.

    2D if the images are ``(n, h, w)`` or ``(n, h, w, 1|3)``, 3D if ``(n, d, h, w)`` (or ``(n, 1|3, d, h, w)``);
    labels ``(n,)`` / ``(n, 1)`` are classes (2: binary, more: multi-class), ``(n, k)`` with several 0/1 columns
    multi-label. Class names are ``"0"``, ``"1"``, ... ."""
    im = arrays["train_images"]
    dims = image_dims(im)
    if dims is None:
        raise DataError(f"train_images of shape {im.shape} are neither 2D (n, h, w[, c]) nor 3D (n, d, h, w) images",
                        path)
    ch = int(channels_first(im[:1], dims, path).shape[1])
    labels = [np.asarray(arrays[f"{s}_labels"]) for s in SPLITS]
    y = labels[0]
    if y.ndim == 2 and y.shape[1] > 1:
        if not all(np.isin(lab, (0, 1)).all() for lab in labels):
            raise DataError(f"labels of shape {y.shape} have several columns but are not 0/1 (multi-label)", path)
        task, names = MULTILABEL, [str(i) for i in range(y.shape[1])]
    else:
        allv = np.concatenate([lab.reshape(-1) for lab in labels])
        if allv.size == 0 or not np.all(np.equal(np.mod(allv, 1), 0)) or allv.min() < 0:
            raise DataError("labels must be non-negative class indices (0, 1, ...)", path)
        n_classes = int(allv.max()) + 1
        seen = np.unique(labels[0].reshape(-1))
        if len(seen) < 2:
            raise DataError(f"the training split has one class only ({int(seen[0]) if len(seen) else 'none'}); a "
                            "classifier needs at least two", path)
        task, names = (BINARY if n_classes == 2 else MULTICLASS), [str(i) for i in range(n_classes)]
    n = {s: int(len(arrays[f"{s}_images"])) for s in SPLITS}
    side = int(im.shape[1] if (dims == 2 or im.ndim == 4) else im.shape[2])
    stem = path.name[:-4] if path.name.endswith(".npz") else path.stem
    return MedMNISTInfo(name=stem, task=task, labels=tuple(names), n_channels=ch, n_samples=n, md5={}, dims=dims,
                        description="a MedMNIST-format file outside the catalogue", license="unknown",
                        sizes=(size or side,))


def load_medmnist(name: str | None, size: int = 28, root: str | Path | None = None, *,
                  check_md5: bool = True, path: str | Path | None = None) -> SplitData:
    """Load a MedMNIST dataset with its official train/val/test split.

    Args:
        name: dataset name, e.g. ``"pneumoniamnist"``; None for a MedMNIST-format file outside the catalogue
            (``path`` required; dimensions, channels, task and class names inferred: ``infer_info``).
        size: 28, 64, 128 or 224 (2D) / 28 or 64 (3D).
        root: folder holding the npz files (default ``$MEDLENS_DATA/medmnist``).
        check_md5: verify the file against the official MD5 (cached once verified).
        path: read this npz instead of the catalogue location (MD5 not checked).
    """
    if name is None:
        if path is None:
            raise DataError("a MedMNIST-format file needs data.name (a catalogue dataset) or data.path (an .npz)")
        path = Path(path)
        arrays = read_npz(path)
        info = infer_info(arrays, path)
        size = info.sizes[0]   # the file's own side, whatever the config's default
    else:
        info = get_info(name)
        verified = path is None and check_md5
        if path is None:
            path = verify(name, size, root) if check_md5 else medmnist_path(name, size, root)
        path = Path(path)
        arrays = read_npz(path, limit=not verified)  # an official file (MD5 checked) may be larger than the limit
    out = {}
    for split in SPLITS:
        images = _channels_first(arrays[f"{split}_images"], info, path)
        labels = arrays[f"{split}_labels"]
        if len(labels) != len(images):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels", path)
        out[split] = ArrayDataset(images, labels, info.task, list(info.labels), name=f"{info.name}/{split}",
                                  meta={"dataset": info.name, "size": size, "file": str(path)})
    return SplitData(out["train"], out["val"], out["test"], split_method="official MedMNIST split")
