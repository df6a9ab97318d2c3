"""What an input must satisfy before medlens decodes it: size limits, finite values, valid spacing, safe paths.

Sizes are checked from the file's header, before any pixel is decoded or decompressed, so a
126-byte PNG that claims 12000 x 12000 pixels, or a NIfTI bomb, is refused at once. The limits
are environment settings (plain integers; ``_`` separators allowed):

- ``MEDLENS_MAX_PIXELS``: the most pixels a 2D image may hold (default 2**26 = 67,108,864, e.g.
  8192 x 8192). PIL's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is set to it.
- ``MEDLENS_MAX_VOXELS``: the most voxels a volume may hold: a 3D file, a multi-frame DICOM or a
  DICOM series (default 2**28 = 268,435,456, e.g. 512 x 512 x 1024).
- ``MEDLENS_MAX_DECOMPRESSED_BYTES``: the most bytes a compressed input (``.nii.gz``, a deflated
  DICOM) may expand to (default 2**32 = 4 GiB).

Every refusal is a one-line ``DataError`` naming the file, the size and the setting to raise.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from medlens.errors import ConfigError, DataError, MedlensWarning

MAX_PIXELS_ENV = "MEDLENS_MAX_PIXELS"
MAX_VOXELS_ENV = "MEDLENS_MAX_VOXELS"
MAX_DECOMPRESSED_ENV = "MEDLENS_MAX_DECOMPRESSED_BYTES"
DEFAULTS = {MAX_PIXELS_ENV: 2**26, MAX_VOXELS_ENV: 2**28, MAX_DECOMPRESSED_ENV: 2**32}


def setting(name: str) -> int:
    """The positive integer value of a limit setting (its default when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULTS[name]
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value


def max_pixels() -> int:
    return setting(MAX_PIXELS_ENV)


def max_voxels() -> int:
    return setting(MAX_VOXELS_ENV)


def max_decompressed_bytes() -> int:
    return setting(MAX_DECOMPRESSED_ENV)


def shown(path: str | Path) -> str:
    """A path as printable text: bytes that are not UTF-8 shown as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_size(shape, path: str | Path, volume: bool | None = None, samples: int = 1) -> None:
    """Refuse an image whose header claims more pixels (2D) or voxels (volume) than the limit allows.

    ``shape`` holds the spatial dimensions; ``volume`` defaults to ``len(shape) >= 3``; ``samples``
    (values per pixel: 3 for RGB) multiplies the count.
    """
    dims = [int(d) for d in shape]
    samples = int(samples)
    if any(d < 0 for d in dims) or samples < 0:
        raise DataError(f"header claims a negative image size {' x '.join(map(str, dims))}", shown(path))
    n = math.prod(dims) * samples
    volume = len(dims) >= 3 if volume is None else volume
    name, unit = (MAX_VOXELS_ENV, "voxels") if volume else (MAX_PIXELS_ENV, "pixels")
    limit = setting(name)
    if n > limit:
        size = " x ".join(map(str, dims)) + (f" x {samples} samples" if samples != 1 else "")
        raise DataError(f"image size {size} = {n:,} {unit} is over the limit of {limit:,} {unit} "
                        f"(raise {name} to allow it)", shown(path))


def check_decompressed(nbytes: int, path: str | Path) -> None:
    """Refuse a compressed input whose expanded size (from its header) is over the limit."""
    limit = max_decompressed_bytes()
    if nbytes > limit:
        raise DataError(f"compressed data expands to {nbytes:,} bytes or more, over the limit of {limit:,} "
                        f"(raise {MAX_DECOMPRESSED_ENV} to allow it)", shown(path))


def inflated_size(chunks: Iterable[bytes], path: str | Path, wbits: int = -zlib.MAX_WBITS,
                  step: int = 1 << 20) -> int:
    """Stream-decompress a deflate/zlib stream given as byte chunks, counting bytes without keeping them.

    Returns the number of bytes the stream expands to (up to its end); raises ``DataError`` as soon
    as that passes ``MEDLENS_MAX_DECOMPRESSED_BYTES``: memory stays at one step however large the bomb.
    """
    limit = max_decompressed_bytes()
    d = zlib.decompressobj(wbits)
    total = 0
    for data in chunks:
        while data and not d.eof:
            try:
                total += len(d.decompress(data, step))
            except zlib.error as e:
                raise DataError(f"corrupt compressed data ({e})", shown(path)) from None
            if total > limit:
                check_decompressed(total, path)  # raises
            data = d.unconsumed_tail
        if d.eof:
            return total
    return total + len(d.flush())


def check_finite(array: np.ndarray, path: str | Path, allow_nonfinite: bool = False) -> None:
    """NaN or infinite values: an error naming the file, or a warning when ``allow_nonfinite``.

    An image with no finite value at all is refused even with ``allow_nonfinite``.
    """
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if not bad:
        return
    n_nan = int(np.count_nonzero(np.isnan(array)))
    what = (f"every value ({array.size:,}) is NaN or infinite" if bad == array.size else
            f"{bad:,} of {array.size:,} values are NaN or infinite ({n_nan:,} NaN, {bad - n_nan:,} infinite)")
    if bad == array.size or not allow_nonfinite:
        hint = "" if bad == array.size else " (pass allow_nonfinite=True to load anyway)"
        raise DataError(what + hint, shown(path))
    warnings.warn(f"{shown(path)}: {what}; loaded anyway (allow_nonfinite)", MedlensWarning)


def check_spacing(spacing, path: str | Path) -> None:
    if len(spacing) == 0 or not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"invalid voxel spacing {tuple(float(s) for s in spacing)} (must be finite and > 0)",
                        shown(path))


def require_utf8(path: str | Path, what: str = "path") -> None:
    """Refuse a path that is not valid UTF-8 (SimpleITK aborts the process on one)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{what} is not valid UTF-8; SimpleITK cannot use it (rename it)", shown(path)) from None
