"""PNG / JPEG / TIFF (8 and 16 bit) and NPZ / NPY readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.errors import DataError
from medlens.io.image import Image

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_raster(path: str | Path) -> Image:
    """Read a 2D raster image; keeps 16-bit depth; RGB(A) becomes (y, x, 3)."""
    from PIL import Image as PILImage, UnidentifiedImageError

    path = Path(path)
    try:
        with PILImage.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGBA", "P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGB" if mode != "LA" else "L")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"not a readable image ({e.__class__.__name__}: {e})", path) from e
    if arr.dtype == np.int32 and mode.startswith("I"):
        arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() < 65536 else arr
    rgb = arr.ndim == 3
    return Image(arr, modality="XC" if rgb else "OT", is_rgb=rgb,
                 meta={"source": path.name, "format": path.suffix.lower().lstrip(".")})


def read_npz_image(path: str | Path, key: str | None = None, index: int = 0) -> Image:
    """Read one image from a ``.npy`` or ``.npz`` (``key`` or the first array; ``index`` for a stack)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise DataError("npz holds no arrays", path)
                k = key or ("test_images" if "test_images" in z.files else z.files[0])
                if k not in z.files:
                    raise DataError(f"npz has no key '{k}' (has {z.files})", path)
                arr = z[k]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, OSError
        raise DataError(f"not a readable numpy file ({e.__class__.__name__}: {e})", path) from e
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] != 3 and arr.shape[0] > 3 and key is None
                         and path.suffix == ".npz"):
        arr = arr[index]  # a stack of 2D images (N, H, W[, C]) such as MedMNIST's *_images
    rgb = arr.ndim == 3 and arr.shape[-1] == 3
    return Image(np.asarray(arr), is_rgb=rgb, meta={"source": path.name, "format": path.suffix.lstrip(".")})
