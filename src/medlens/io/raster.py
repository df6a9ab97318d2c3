"""PNG / JPEG / TIFF / BMP (8 and 16 bit) and NPZ / NPY readers.

Sizes are checked from the header before decoding (``medlens.io.limits``); a PNG whose pixel
data ends early is refused (Pillow would fill the missing rows with zeros).
"""

from __future__ import annotations

import math
import re
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage, ImageFile, UnidentifiedImageError

from medlens.errors import DataError
from medlens.io.formats import suffix_of
from medlens.io.image import Image
from medlens.io.limits import MAX_PIXELS_ENV, check_decompressed, check_size, inflated_size, max_pixels, shown

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _pil():
    """PIL, with its decompression-bomb limit set to ``MEDLENS_MAX_PIXELS`` and truncated files refused."""
    PILImage.MAX_IMAGE_PIXELS = max_pixels()
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return PILImage


def read_raster(path: str | Path) -> Image:
    """Read a 2D raster image; keeps 16-bit depth; RGB(A) becomes (y, x, 3)."""
    PILImage = _pil()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # the size is checked just below
            im = PILImage.open(path)
        with im:
            check_size(im.size[::-1], path, volume=False)
            if im.format == "PNG":
                _check_png_data(path)  # before decoding: Pillow would zero-fill the rows a short stream lacks
            im.load()
            mode = im.mode
            if mode in ("RGBA", "P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGB" if mode != "LA" else "L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError("file not found", shown(path)) from None
    except PILImage.DecompressionBombError as e:  # PIL's own check in open(), at twice its limit
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "its size"
        raise DataError(f"image size {size} is over the limit of {max_pixels():,} pixels (raise "
                        f"{MAX_PIXELS_ENV} to allow it)", shown(path)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataError(f"not a readable image ({e.__class__.__name__}: {e})", shown(path)) from e
    if arr.dtype == np.int32 and mode.startswith("I"):
        arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() < 65536 else arr
    rgb = arr.ndim == 3
    return Image(arr, modality="XC" if rgb else "OT", is_rgb=rgb,
                 meta={"source": path.name, "format": path.suffix.lower().lstrip(".")})


def _png_chunks(f):
    """(type, data) of each chunk of a PNG file, in order, until IEND or the end of the file."""
    f.seek(len(_PNG_SIGNATURE))
    while True:
        head = f.read(8)
        if len(head) < 8:
            return
        length, cid = struct.unpack(">I4s", head)
        yield cid, f.read(length)
        f.read(4)  # CRC (Pillow has checked it while decoding)
        if cid == b"IEND":
            return


def _png_expected_bytes(width: int, height: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of filtered scanlines a PNG's IDAT stream must expand to (PNG spec, section 7 and 8)."""
    bits = _PNG_CHANNELS.get(color, 4) * depth
    total = 0
    for x0, y0, dx, dy in (_ADAM7 if interlace else ((0, 0, 1, 1),)):
        pw, ph = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pw > 0 and ph > 0:
            total += ph * (1 + -(-pw * bits // 8))
    return total


def _check_png_data(path: Path) -> None:
    """Refuse a PNG whose zlib stream ends before every row is there (Pillow zero-fills the rest)."""
    with open(path, "rb") as f:
        chunks = _png_chunks(f)
        cid, ihdr = next(chunks, (b"", b""))
        if cid != b"IHDR" or len(ihdr) < 13:
            raise DataError("PNG without a valid IHDR header", shown(path))
        width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
        need = _png_expected_bytes(width, height, depth, color, interlace)
        got = inflated_size((data for c, data in chunks if c == b"IDAT"), path, wbits=15)
    if got < need:
        raise DataError(f"PNG pixel data ends early ({got:,} of {need:,} bytes): a truncated or corrupt file",
                        shown(path))


# ----------------------------------------------------------------------------------------- numpy


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except ValueError as e:
        raise DataError(f"not a readable numpy file ({' '.join(str(e).split())[:200]})", shown(path)) from None
    return tuple(shape), np.dtype(dtype)


# deflate cannot expand more than 1032:1 (a 258-byte match per two bits), so a zip member that claims
# more than this of its compressed size is lying about its size
_DEFLATE_MAX_RATIO = 1032


def _check_declared(shape, dtype: np.dtype, offset: int, available: int, path: Path, what: str) -> int:
    """The bytes an npy header declares, refused when the file (or zip member) holds fewer: numpy would
    allocate the declared array before reading (10^9 images: a MemoryError for 730 GiB)."""
    nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
    if offset + nbytes > available:
        dims = " x ".join(map(str, shape))
        raise DataError(f"{what} declares shape {dims} of {dtype} = {nbytes:,} bytes but holds only "
                        f"{max(0, available - offset):,}: a truncated or crafted file", shown(path))
    return nbytes


def npz_member_header(z: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) of the array ``key`` of an open npz, from its npy header and the zip's own sizes,
    before anything is allocated: a member that declares more than it holds is refused in one line."""
    info = z.getinfo(f"{key}.npy")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(f"array '{key}' is compressed with method {info.compress_type}; numpy writes stored or "
                        "deflated members only", shown(path))
    most = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO) + 1024
    if info.file_size > most:
        raise DataError(f"array '{key}' claims {info.file_size:,} bytes, more than its {info.compress_size:,} "
                        "compressed bytes can hold: a crafted file", shown(path))
    with z.open(info) as f:
        shape, dtype = _npy_header(f, path)
        offset = f.tell()
    return shape, dtype, _check_declared(shape, dtype, offset, info.file_size, path, f"array '{key}'")


def _is_stack(shape, path: Path, key: str | None) -> bool:
    """A stack of 2D images (N, H, W[, C]) such as MedMNIST's ``*_images``: one of them is read."""
    return len(shape) == 4 or (len(shape) == 3 and shape[-1] != 3 and shape[0] > 3 and key is None
                               and suffix_of(path) == ".npz")


def _check_array_header(shape, dtype: np.dtype, path: Path, stack: bool) -> None:
    """Numbers only; one image within the size limit; the whole array within the decompression limit."""
    if dtype.kind not in "biuf":
        raise DataError(f"array of dtype {dtype} is not an image (numbers expected)", shown(path))
    one = shape[1:] if stack else shape
    spatial = one[:-1] if len(one) >= 3 and one[-1] in (3, 4) else one
    check_size(spatial, path, volume=len(spatial) >= 3)
    check_decompressed(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, path)


def read_npz_image(path: str | Path, key: str | None = None, index: int = 0) -> Image:
    """Read one image from a ``.npy`` or ``.npz`` (``key`` or the first array; ``index`` for a stack)."""
    path = Path(path)
    try:
        if suffix_of(path) == ".npy":
            with open(path, "rb") as f:
                shape, dtype = _npy_header(f, path)
                _check_array_header(shape, dtype, path, _is_stack(shape, path, key))
                _check_declared(shape, dtype, f.tell(), path.stat().st_size, path, "the array")
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise DataError("npz holds no arrays", shown(path))
                k = key or ("test_images" if "test_images" in z.files else z.files[0])
                if k not in z.files:
                    raise DataError(f"npz has no key '{k}' (has {z.files})", shown(path))
                shape, dtype, _ = npz_member_header(z.zip, k, path)
                _check_array_header(shape, dtype, path, _is_stack(shape, path, key))
                arr = z[k]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("file not found", shown(path)) from None
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise DataError(f"not a readable numpy file ({e.__class__.__name__}: {e})", shown(path)) from e
    if _is_stack(arr.shape, path, key):
        if not -arr.shape[0] <= index < arr.shape[0]:
            raise DataError(f"index {index} is outside the stack of {arr.shape[0]} images", shown(path))
        arr = arr[index]  # a stack of 2D images (N, H, W[, C]) such as MedMNIST's *_images
    rgb = arr.ndim == 3 and arr.shape[-1] == 3
    return Image(np.asarray(arr), is_rgb=rgb, meta={"source": path.name, "format": path.suffix.lstrip(".")})
