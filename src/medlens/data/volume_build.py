"""Preparing one volume for the volume store (``data.volume_store``): crop, resample, normalise, write atomically.

This module imports only numpy, Blosc2, SimpleITK and ``medlens.io``, not the rest of ``medlens.data`` (which brings
torch, pandas and scikit-learn, ~550 MB resident): ``volume_store.prepare_volume`` runs it as a script in a child
process (``python -c 'runpy.run_path(<this file>)' SOURCE DEST SPEC``), so a volume and its reader's copies of it
(a DICOM series: the files' pixel data, the stacked slices and the rescaled volume, 3x the volume) never live in the
long-running process, and the child's own peak stays far below the parent's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import blosc2
import numpy as np
import SimpleITK as sitk

from medlens.errors import DataError, MedlensError
from medlens.io import load
from medlens.io.image import Image

FORMAT = 1
#: Chunks and blocks of a stored volume, (z, y, x) voxels. A patch read decompresses only the blocks it covers: a
#: block of one 64 x 64 slice tile (8 KB of int16, inside a core's L1/L2 cache) is all a 2D axial patch of up to 64 px
#: needs per tile, and a 3D patch (32 mm at 1 mm from 0.7 x 0.7 x 2.5 mm voxels: 13 x 46 x 46) covers 13-52 of them;
#: a chunk of 16 such slices (128 KB) is the unit of the file's index, large enough that a 512 x 512 x 300 CT is
#: about 1,200 chunks, small enough that a patch touches at most 2 x 2 x 2 of them.
CHUNKS = (16, 64, 64)
BLOCKS = (1, 64, 64)
_CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 1, "nthreads": 1}
_NORMALIZE = ("none", "window", "zscore")


@dataclass(frozen=True)
class VolumeSpec:
    """How a volume is prepared for the store. The defaults keep the source's grid and values (raw HU of a CT)."""

    spacing: tuple[float, float, float] | None = None     # target (z, y, x) mm; None keeps the source's
    crop_threshold: float | None = None                   # crop to the bbox of voxels above it; None: no crop
    normalize: str = "none"                               # none | window | zscore
    window: tuple[float, float] | None = None             # (lo, hi) of ``window``
    chunks: tuple[int, int, int] = CHUNKS
    blocks: tuple[int, int, int] = BLOCKS

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE:
            raise DataError(f"volume normalisation must be one of {list(_NORMALIZE)}, not {self.normalize!r}")
        if self.normalize == "window" and (self.window is None or not self.window[0] < self.window[1]):
            raise DataError(f"volume normalisation 'window' needs a window lo < hi, not {self.window}")
        if self.spacing is not None and not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise DataError(f"volume target spacing must be finite and > 0 mm, not {self.spacing}")

    def key(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_key(cls, key: str) -> "VolumeSpec":
        """The spec ``key()`` describes (how a build process receives it)."""
        d = json.loads(key)
        if d.pop("format", None) != FORMAT:
            raise DataError("a volume spec of another format")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)



def _bbox_above(arr: np.ndarray, threshold: float) -> tuple[slice, slice, slice] | None:
    """The bounding box of ``arr > threshold`` (slab by slab: a slab's mask at a time), None when empty."""
    zs, ys, xs = np.zeros(arr.shape[0], bool), np.zeros(arr.shape[1], bool), np.zeros(arr.shape[2], bool)
    for z in range(0, arr.shape[0], CHUNKS[0]):
        m = arr[z:z + CHUNKS[0]] > threshold
        zs[z:z + CHUNKS[0]] = m.any((1, 2))
        ys |= m.any((0, 2))
        xs |= m.any((0, 1))
    if not zs.any():
        return None
    return cast(tuple[slice, slice, slice], tuple(slice(int(np.flatnonzero(a)[0]), int(np.flatnonzero(a)[-1]) + 1)
                                                  for a in (zs, ys, xs)))


def _plain(v: str | int | float) -> str | int | float | bool:
    """A metadata value as its plain Python type (pydicom's DSfloat and IS are subclasses msgpack refuses)."""
    return bool(v) if isinstance(v, bool) else int(v) if isinstance(v, int) else float(v) if isinstance(v, float) \
        else str(v)


def prepare_array(image: Image, spec: VolumeSpec) -> tuple[np.ndarray, dict]:
    """``image`` prepared by ``spec``: (array, geometry record)."""
    if image.spatial_dims != 3 or image.is_rgb:
        raise DataError(f"the volume store holds grey 3D volumes, not a {image.spatial_dims}D "
                        f"{'colour ' if image.is_rgb else ''}image", image.meta.get("source"))
    arr = image.array
    offset = (0, 0, 0)
    box = _bbox_above(arr, spec.crop_threshold) if spec.crop_threshold is not None else None
    if box is not None:
        offset = tuple(sl.start for sl in box)
        arr = arr[box]
    origin = tuple(float(v) for v in image.voxel_to_world(offset))
    spacing = tuple(float(s) for s in image.spacing)
    stats: dict[str, float] = {}
    if spec.spacing is not None and not np.allclose(spec.spacing, spacing, rtol=1e-6):
        src = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        src.SetSpacing(list(reversed(spacing)))
        src.SetOrigin(origin)
        src.SetDirection([float(d) for d in np.asarray(image.direction).ravel()])
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(arr.shape, spacing, spec.spacing)]
        ref = sitk.Image(list(reversed(size)), sitk.sitkFloat32)
        ref.SetSpacing(list(reversed(spec.spacing)))
        ref.SetOrigin(origin)
        ref.SetDirection(src.GetDirection())
        fill = float(np.min(arr)) if arr.size else 0.0
        out = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), ref, sitk.Transform(),
                                                  sitk.sitkLinear, fill, sitk.sitkFloat32))
        del src
        arr = np.rint(out).astype(arr.dtype) if spec.normalize == "none" and arr.dtype.kind in "iu" else out
        spacing = tuple(float(s) for s in spec.spacing)
    if spec.normalize == "window":
        lo, hi = cast(tuple[float, float], spec.window)
        arr = ((np.clip(arr, lo, hi, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32)
    elif spec.normalize == "zscore":
        a = np.asarray(arr, np.float32)
        body = a[a > spec.crop_threshold] if spec.crop_threshold is not None else a
        mean, std = (float(body.mean()), float(body.std())) if body.size else (0.0, 1.0)
        arr = (a - mean) / max(std, 1e-8)
        stats = {"mean": mean, "std": std}
    meta = {k: _plain(v) for k, v in image.meta.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
    rec = {"format": FORMAT, "shape": [int(s) for s in arr.shape], "spacing": list(spacing), "origin": list(origin),
           "direction": [float(d) for d in np.asarray(image.direction).ravel()], "offset": [int(o) for o in offset],
           "source_shape": [int(s) for s in image.shape], "source_spacing": [float(s) for s in image.spacing],
           "source_origin": [float(o) for o in image.origin], "modality": str(image.modality), "meta": meta,
           "stats": stats}
    return np.ascontiguousarray(arr), rec


def write_volume(path: str | Path, arr: np.ndarray, rec: dict, spec: VolumeSpec = VolumeSpec()) -> Path:
    """Write a prepared volume atomically: a temporary file, its geometry, fsync, then the rename."""
    chunks = tuple(min(c, n) for c, n in zip(spec.chunks, arr.shape))
    blocks = tuple(min(b, c) for b, c in zip(spec.blocks, chunks))
    return write_array(path, arr, rec, chunks, blocks)


def write_array(path: str | Path, arr: np.ndarray, rec: dict, chunks: tuple[int, ...],
                blocks: tuple[int, ...] | None = None) -> Path:
    """Write ``arr`` as a Blosc2 NDArray of ``chunks`` (and ``blocks``) with ``rec`` as its ``vlmeta['medlens']``,
    atomically: a temporary file, the record, fsync, then the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}.b2nd"
    try:
        nd: Any = blosc2.asarray(cast(Any, arr), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks,
                                 cparams=_CPARAMS)
        nd.vlmeta["medlens"] = rec
        del nd
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build(source: str | Path, dest: str | Path, spec: VolumeSpec) -> Path:
    """Read ``source``, prepare it by ``spec`` and write it to ``dest`` (atomically)."""
    image = load(source)
    arr, rec = prepare_array(image, spec)
    del image
    return write_volume(dest, arr, rec, spec)


def main(argv: list[str]) -> int:
    """``SOURCE DEST SPEC_KEY``: build one volume; a bad source is one line on stderr and exit status 2."""
    try:
        build(argv[0], argv[1], VolumeSpec.from_key(argv[2]))
    except MedlensError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
