"""The volume store: CT and MR volumes prepared once (nnU-Net style) into chunked Blosc2 NDArrays that patch readers
slice, memory-mapped, instead of holding the whole volume.

Layout (``cache_root`` of ``data.store``: ``data.store``, else ``$MEDLENS_CACHE``, else ``~/.cache/medlens/store``)::

    <root>/volumes/<spec hash>/spec.txt               the preparation the folder holds (``VolumeSpec.key``)
    <root>/volumes/<spec hash>/<source key>.b2nd       one prepared volume: a Blosc2 NDArray (z, y, x), its geometry
                                                       in the array's ``vlmeta['medlens']``

Preparation (``VolumeSpec``): crop to the body (the bounding box of the voxels above ``crop_threshold``, nnU-Net's
crop to nonzero with a threshold for CT air), resample to ``spacing`` (linear), normalise (``none``: the source's
values and dtype, e.g. raw HU; ``window``: clipped to [lo, hi] and scaled to [0, 1]; ``zscore``: MR, by the mean and
standard deviation of the cropped body). The geometry kept is the prepared grid's (spacing, origin, direction, so
world <-> voxel maps hold on the stored array) with the crop offset and the source's shape, spacing and origin.

A source is keyed by every file it is made of (a ``.mhd`` and its data file, every file of a DICOM series folder):
resolved path, size and mtime (ns); a changed file gives a new key and the volume is prepared again, a changed
preparation is another folder. A volume is written to ``.tmp-<pid>-<id>.b2nd``, its geometry added, fsynced and
renamed: a file under its final name is complete, and a file that does not open with a valid geometry record is
prepared again. Temporaries of dead processes are removed by the next builder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, cast

import blosc2
import numpy as np

from medlens.data import volume_build
from medlens.data.store import cache_root
from medlens.data.volume_build import BLOCKS, CHUNKS, FORMAT, VolumeSpec, prepare_array, write_array, write_volume
from medlens.errors import DataError
from medlens.io.image import Image
from medlens.utils import remove_pid_named

__all__ = ["BLOCKS", "CHUNKS", "FORMAT", "StoredVector", "StoredVolume", "VolumeSpec", "key_folder", "prepare_array",
           "prepare_volume", "release_freed_memory", "volume_folder", "volume_source_key", "write_array", "write_volume"]
_TMP = re.compile(r"^\.tmp-(\d+)-")
_DPARAMS = {"nthreads": 1}
_CHILD = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"

def volume_folder(spec: VolumeSpec, root: str | Path | None = None) -> Path:
    return key_folder(spec.key(), root)


def key_folder(key: str, root: str | Path | None = None) -> Path:
    """The folder of the volumes prepared by the preparation ``key`` (text): ``<root>/volumes/<its hash>``."""
    return cache_root(root) / "volumes" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _mhd_data_file(path: Path) -> Path | None:
    """The data file a ``.mhd`` header names (``ElementDataFile``), None when the data is inside it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192).decode("latin-1")
    except OSError:
        return None
    m = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", head, re.M)
    if not m or m.group(1).upper() == "LOCAL":
        return None
    return path.parent / m.group(1)


def source_files(path: str | Path) -> list[Path]:
    """Every file a volume source is made of: a folder's files (a DICOM series), a ``.mhd`` and its data file, or
    the one file."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    out = [path]
    if path.suffix.lower() == ".mhd":
        data = _mhd_data_file(path)
        if data is not None and data.exists():
            out.append(data)
    return out


def volume_source_key(path: str | Path) -> str:
    """A volume source's identity: resolved path, size and mtime (ns) of each of its files."""
    h = hashlib.sha256()
    for p in source_files(path):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _floats(value, n: int, what: str, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"{what} is not a list of {n} numbers")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise ValueError(f"{what} holds a value that is not finite{' and > 0' if positive else ''}")
    return out


def _ints(value, n: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"{what} is not a list of {n} non-negative whole numbers")
    return tuple(value)


class StoredVolume:
    """A prepared volume in the store: ``array`` is the memory-mapped Blosc2 NDArray (slicing it reads and
    decompresses only the blocks the slice covers), with the grid of the stored array (``spacing`` in array order,
    ``origin`` and ``direction`` as ``io.Image``) and the crop ``offset`` in the source's voxels."""

    is_rgb = False
    spatial_dims = 3

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            arr: Any = cast(Any, blosc2.open)(str(self.path), mode="r", mmap_mode="r", dparams=_DPARAMS)
            rec = arr.vlmeta["medlens"]
        except Exception as e:  # noqa: BLE001 - blosc2 raises many kinds on a damaged or partial file
            raise DataError(f"not a complete medlens volume ({type(e).__name__})", self.path) from None
        try:
            if not isinstance(rec, dict) or rec.get("format") != FORMAT:
                raise ValueError("no volume record of this format")
            if arr.ndim != 3 or _ints(rec.get("shape"), 3, "shape") != tuple(arr.shape):
                raise ValueError(f"array {tuple(arr.shape)} is not the shape recorded")
            self.spacing = _floats(rec.get("spacing"), 3, "spacing", positive=True)
            self.origin = _floats(rec.get("origin"), 3, "origin")
            self.direction = np.asarray(_floats(rec.get("direction"), 9, "direction")).reshape(3, 3)
            if abs(abs(float(np.linalg.det(self.direction))) - 1.0) > 1e-3:
                raise ValueError("direction is not a rotation")
            self.offset = _ints(rec.get("offset"), 3, "offset")
            self.source_shape = _ints(rec.get("source_shape"), 3, "source shape")
            self.source_spacing = _floats(rec.get("source_spacing"), 3, "source spacing", positive=True)
            self.modality = str(rec.get("modality", "OT"))
            meta = rec.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("meta is not a mapping")
            self.meta: dict[str, Any] = {str(k): v for k, v in meta.items()
                                         if isinstance(v, (str, int, float))}
            stats = rec.get("stats", {})
            self.stats = {str(k): float(v) for k, v in stats.items()} if isinstance(stats, dict) else {}
            extra = rec.get("extra", {})
            if not isinstance(extra, dict):
                raise ValueError("extra is not a mapping")
            self.extra: dict[str, Any] = dict(extra)  # what the writer recorded beyond the geometry (its reader checks)
        except (ValueError, TypeError) as e:
            raise DataError(f"not a complete medlens volume ({e})", self.path) from None
        self.array: Any = arr  # blosc2.NDArray
        self.chunk_reads = 0  # chunks read by ``read_chunks`` since opened

    def __getstate__(self) -> dict:
        """Picklable (datasets go to worker processes): the path, opened again there."""
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return cast(tuple[int, int, int], tuple(int(s) for s in self.array.shape))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def spacing_xyz(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    def voxel_to_world(self, index_zyx) -> np.ndarray:
        """World (x, y, z) mm of voxel indices in array order (``io.Image.voxel_to_world``)."""
        ijk = np.asarray(index_zyx, float)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing_xyz)) @ self.direction.T

    def world_to_voxel(self, point_xyz) -> np.ndarray:
        """Fractional voxel indices (z, y, x) of world points (``io.Image.world_to_voxel``)."""
        p = np.asarray(point_xyz, float) - np.asarray(self.origin)
        return ((p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing_xyz))[..., ::-1]

    def read(self, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """The voxels of ``box`` (slices in array order; all of them when None) as a numpy array."""
        return np.asarray(self.array[box if box is not None else (slice(None),) * 3])

    def read_chunks(self, box: tuple[slice, ...]) -> np.ndarray:
        """The voxels of ``box`` (slices of step 1 inside the array), read chunk by chunk: one read of the part of
        the box inside each chunk it overlaps (``chunk_reads`` counts them), so a patch costs the chunks it touches."""
        lo = [sl.indices(n)[0] for sl, n in zip(box, self.shape)]
        hi = [max(a, sl.indices(n)[1]) for a, sl, n in zip(lo, box, self.shape)]
        out = np.empty([b - a for a, b in zip(lo, hi)], self.dtype)
        if not out.size:
            return out
        size = [int(c) for c in self.array.chunks]
        first = [a // c for a, c in zip(lo, size)]
        last = [(b - 1) // c for b, c in zip(hi, size)]
        for idx in np.ndindex(*[b - a + 1 for a, b in zip(first, last)]):
            c0 = [(f + i) * c for f, i, c in zip(first, idx, size)]
            part = tuple(slice(max(a, s), min(b, s + c)) for a, b, s, c in zip(lo, hi, c0, size))
            out[tuple(slice(p.start - a, p.stop - a) for p, a in zip(part, lo))] = self.array[part]
            self.chunk_reads += 1
        return out

    def slabs(self) -> Any:
        """(z slice, voxels) of consecutive slabs, one chunk thick: a pass over the volume that holds one slab."""
        step = int(self.array.chunks[0])
        for z in range(0, self.shape[0], step):
            sl = slice(z, min(z + step, self.shape[0]))
            yield sl, np.asarray(self.array[sl])

    def below(self, value: float) -> np.ndarray:
        """The boolean mask ``volume < value``, computed slab by slab (never the whole volume at its own dtype)."""
        out = np.empty(self.shape, bool)
        for sl, slab in self.slabs():
            np.less(slab, value, out=out[sl])
        return out

    def geometry(self) -> Image:
        """An ``io.Image`` with this volume's grid, shape and metadata and no voxels (a zero-strided array): for what
        needs only the geometry, e.g. ordering a DICOM series' instances like the z axis."""
        return Image(np.broadcast_to(np.zeros((), self.dtype), self.shape), spacing=self.spacing, origin=self.origin,
                     direction=self.direction, modality=self.modality, meta=dict(self.meta))

    def image(self, box: tuple[slice, slice, slice] | None = None) -> Image:
        """An in-memory ``io.Image`` of ``box`` (all the volume when None) with its own origin."""
        whole = (slice(None), slice(None), slice(None))
        start = [sl.indices(n)[0] for sl, n in zip(box or whole, self.shape)]
        return Image(self.read(box or whole), spacing=self.spacing, origin=tuple(self.voxel_to_world(start)),
                     direction=self.direction, modality=self.modality, meta=dict(self.meta))


class StoredVector:
    """A 1D Blosc2 array of the store (``write_array``), memory-mapped: ``v[i]`` reads the block ``i`` falls in.
    ``DataError`` when it is missing, damaged, or not ``length`` values of ``dtype``. Picklable (datasets go to worker
    processes): opened again there."""

    def __init__(self, path: str | Path, length: int, dtype: str) -> None:
        self.path, self.length, self.dtype = Path(path), int(length), str(dtype)
        try:
            arr: Any = cast(Any, blosc2.open)(str(self.path), mode="r", mmap_mode="r", dparams=_DPARAMS)
            ok = arr.ndim == 1 and int(arr.shape[0]) == self.length and np.dtype(arr.dtype) == np.dtype(self.dtype)
        except Exception as e:  # noqa: BLE001 - blosc2 raises many kinds on a damaged or partial file
            raise DataError(f"not a complete medlens array ({type(e).__name__})", self.path) from None
        if not ok:
            raise DataError(f"not {self.length} values of {self.dtype}", self.path)
        self.array: Any = arr

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.array[i]

    def __getstate__(self) -> dict:
        return {"path": self.path, "length": self.length, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["length"], state["dtype"])


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere). A volume's reader
    allocates thousands of slice-sized buffers; once they are freed glibc keeps them for reuse, and the process's
    resident memory stays ~150 MB above what it holds for every scan read before."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def prepare_volume(source: str | Path, spec: VolumeSpec = VolumeSpec(), root: str | Path | None = None,
                   loader: Callable[[Path], Image] | None = None) -> StoredVolume:
    """The stored volume of ``source`` (a volume file or a DICOM series folder) under ``spec``: opened from the store,
    or prepared and stored first when the store lacks it (or holds a file that is not a complete volume).

    The preparation runs in a child process that imports only what reading and writing a volume need
    (``data.volume_build``): the whole volume exists only there. With ``loader`` (a function of the path returning an
    ``io.Image``) it runs in this process instead."""
    source = Path(source)
    if not source.exists():
        raise DataError("volume not found", source)
    folder = volume_folder(spec, root)
    final = folder / f"{volume_source_key(source)}.b2nd"
    if final.exists():
        try:
            return StoredVolume(final)
        except DataError:
            pass  # damaged or not ours: prepared again below
    folder.mkdir(parents=True, exist_ok=True)
    remove_pid_named(folder, _TMP)
    spec_txt = folder / "spec.txt"
    if not spec_txt.exists():
        spec_txt.write_text(spec.key() + "\n", encoding="utf-8")
    if loader is not None:
        image = loader(source)
        arr, rec = prepare_array(image, spec)
        del image
        write_volume(final, arr, rec, spec)
        del arr
        release_freed_memory()
    else:
        proc = subprocess.run([sys.executable, "-c", _CHILD, volume_build.__file__, str(source), str(final),
                               spec.key()], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise DataError(why if proc.returncode == 2 else f"preparing the volume failed: {why}",
                            None if proc.returncode == 2 else source)
    return StoredVolume(final)
