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

A compressed DICOM frame is also sized from its own codestream header (``jpeg_frame_size`` for the
JPEG SOFn / JPEG-LS SOF55 frame header, ``j2k_image_size`` for the JPEG 2000 SIZ segment,
``rle_segments`` for the RLE segment table) before any decoder runs: decoders size their output
from the codestream, not from Rows/Columns (``medlens.io.dicom`` compares the two).
"""

from __future__ import annotations

import math
import os
import struct
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


# ------------------------------------------------------------------ compressed codestreams (DICOM)
# A decoder sizes its output from the codestream's own header, not from the DICOM Rows/Columns, so a
# 1 KB file whose JPEG frame header claims 40000 x 40000 pixels makes it allocate gigabytes. These
# parsers read that header (a few bytes; nothing is decoded) so the caller can compare it with the
# DICOM attributes and the limits before any decoder runs. Each raises ValueError on a malformed header.

# SOF0..SOF15 (ISO/IEC 10918-1 B.1.1.3) without DHT (C4), JPG (C8) and DAC (CC); SOF55 (F7) is JPEG-LS
# (ISO/IEC 14495-1 C.2.2); DHP (DE) gives the whole image of a hierarchical JPEG, before its frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7, 0xDE}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def jpeg_frame_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the frame header (SOFn, SOF55 or DHP) of a JPEG or JPEG-LS
    codestream: the segments before it are skipped by their lengths; nothing is decoded."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise ValueError("no JPEG frame header before the scan data")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 10 > n:
                raise ValueError("truncated JPEG frame header")
            _, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            return height, width, components
        if length < 2:
            raise ValueError(f"JPEG segment of length {length}")
        pos += 2 + length
    raise ValueError("no JPEG frame header (SOF)")


def j2k_image_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the SIZ segment of a JPEG 2000 codestream (ISO/IEC 15444-1 A.5.1):
    Ysiz - YOsiz, Xsiz - XOsiz and Csiz; a JP2 file's boxes are skipped to its codestream box."""
    pos = 0
    if data[4:8] == b"jP  ":  # JP2 signature box: walk the boxes to 'jp2c'
        while True:
            if pos + 8 > len(data):
                raise ValueError("JP2 file without a codestream box")
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            head = 8
            if length == 1:
                if pos + 16 > len(data):
                    raise ValueError("truncated JP2 box")
                length, head = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
            if kind == b"jp2c":
                pos += head
                break
            if length < head:  # 0 (to the end of the file) or nonsense before the codestream
                raise ValueError("JP2 file without a codestream box")
            pos += length
    if data[pos:pos + 4] != b"\xff\x4f\xff\x51":
        raise ValueError("no JPEG 2000 SOC and SIZ markers")
    if pos + 42 > len(data):
        raise ValueError("truncated JPEG 2000 SIZ segment")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[pos + 8:pos + 24])
    components = struct.unpack(">H", data[pos + 40:pos + 42])[0]
    if xo > xsiz or yo > ysiz:
        raise ValueError(f"JPEG 2000 image offset ({xo}, {yo}) beyond its size ({xsiz}, {ysiz})")
    return ysiz - yo, xsiz - xo, components


def rle_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) byte range of each segment of a DICOM RLE frame (PS3.5 G.3.1: a 64-byte header
    holding the number of segments, 1 to 15, and their offsets, the first one 64, increasing)."""
    if len(data) < 64:
        raise ValueError(f"RLE frame of {len(data)} bytes is shorter than its 64-byte header")
    header = struct.unpack("<16I", data[:64])
    count, offsets = header[0], list(header[1:])
    if not 1 <= count <= 15:
        raise ValueError(f"RLE header names {count} segments (1 to 15 allowed)")
    starts = offsets[:count]
    if starts[0] != 64 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= len(data):
        raise ValueError(f"RLE segment offsets ({', '.join(map(str, starts))}) are not increasing within the frame "
                         f"of {len(data):,} bytes")
    return list(zip(starts, starts[1:] + [len(data)]))
