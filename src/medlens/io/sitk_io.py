"""MHD/RAW, NRRD and NIfTI through SimpleITK, and conversion between ``Image`` and ``sitk.Image``."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.openers import ImageOpener

from medlens.errors import DataError, MedlensError, MedlensWarning
from medlens.io.formats import SITK_SUFFIXES, suffix_of
from medlens.io.image import Image
from medlens.io.limits import (check_decompressed, check_finite, check_size, check_spacing, require_utf8,
                               shown)


def to_sitk(image: Image):
    """``Image`` -> ``SimpleITK.Image`` with the same grid (2D images stay 2D)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.array), isVector=image.is_rgb)
    out.SetSpacing([float(s) for s in image.spacing_xyz])
    out.SetOrigin([float(o) for o in image.origin])
    out.SetDirection([float(d) for d in np.asarray(image.direction).ravel()])
    return out


def from_sitk(img, modality: str = "OT", meta: dict | None = None) -> Image:
    """``SimpleITK.Image`` -> ``Image`` ((z, y, x) array, spacing in array order)."""
    arr = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    rgb = img.GetNumberOfComponentsPerPixel() == 3
    return Image(arr, spacing=tuple(reversed(img.GetSpacing())), origin=tuple(img.GetOrigin()),
                 direction=np.array(img.GetDirection()).reshape(nd, nd), modality=modality, meta=dict(meta or {}),
                 is_rgb=rgb)


def read_nifti(path: Path, allow_nonfinite: bool = False) -> Image:
    """NIfTI through nibabel (SimpleITK silently turns NaN voxels into 0); RAS affine -> LPS geometry.

    The header is checked before any voxel is read: size limits, the decompressed size of a
    ``.nii.gz``, and pixdim (a 0 or NaN voxel size is refused, never read as 1 mm).
    """
    try:
        img = nib.load(str(path))  # the header only
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"unreadable NIfTI (a {type(img).__name__}, not a NIfTI-1 or NIfTI-2 image)", shown(path))
        shape = tuple(int(d) for d in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        check_size(shape, path)
        if suffix_of(path) == ".nii.gz":
            check_decompressed(int(img.header.get_data_offset()) + math.prod(shape) *
                               img.header.get_data_dtype().itemsize, path)
        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)  # pixdim as written (nibabel's copy is fixed up)
        _check_pixdim(raw, min(len(shape), 3), path)
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, float)
    except MedlensError:
        raise
    except Exception as e:  # nibabel raises many types on malformed headers
        raise DataError(f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                        shown(path)) from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"{arr.ndim}D NIfTI images are not supported (shape {arr.shape})", shown(path))
    nd = arr.ndim
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    spacing_xyz = np.linalg.norm(lps, axis=0)
    if np.any(spacing_xyz[:nd] <= 0) or not np.all(np.isfinite(lps)):
        raise DataError("NIfTI affine is singular or not finite", shown(path))
    direction = lps / spacing_xyz
    arr = np.ascontiguousarray(arr.transpose(tuple(range(nd))[::-1]))  # (x, y, z) -> (z, y, x)
    meta = {"source": path.name, "format": "nifti"}
    if nd == 2:
        image = Image(arr, spacing=tuple(spacing_xyz[:2][::-1]), origin=tuple(origin[:2]),
                      direction=direction[:2, :2], meta=meta)
    else:
        image = Image(arr, spacing=tuple(spacing_xyz[::-1]), origin=tuple(origin), direction=direction, meta=meta)
    return _checked(image, path, allow_nonfinite)


def _check_pixdim(raw_header, nd: int, path: Path) -> None:
    """pixdim 0, NaN or negative: refused when the geometry comes from it, a warning when an sform overrides it."""
    pix = np.asarray(raw_header["pixdim"][1:nd + 1], float)
    invalid, negative = ~np.isfinite(pix) | (pix == 0), np.isfinite(pix) & (pix < 0)
    if not invalid.any() and not negative.any():
        return
    shown_pix = ", ".join(f"{v:g}" for v in pix)
    if int(raw_header["sform_code"]) > 0:
        warnings.warn(f"{shown(path)}: NIfTI pixdim ({shown_pix}) is not a valid voxel size; the spacing is taken "
                      "from the sform", MedlensWarning)
    elif invalid.any():
        raise DataError(f"NIfTI pixdim ({shown_pix}) holds a zero or non-finite voxel size and no sform gives "
                        "the spacing; refusing to guess 1 mm", shown(path))
    else:
        warnings.warn(f"{shown(path)}: NIfTI pixdim ({shown_pix}) is negative; using its absolute value",
                      MedlensWarning)


def read_sitk(path: str | Path, allow_nonfinite: bool = False, allow_outside: bool = False) -> Image:
    """Read MHD/RAW, NRRD (SimpleITK) or NIfTI (nibabel).

    Non-finite voxels are an error unless ``allow_nonfinite`` (then a warning). An MHD/NRRD header
    whose data file lies outside the header's folder is refused unless ``allow_outside``. The size
    is checked from the header before any voxel is read (``medlens.io.limits``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", shown(path))
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", shown(path))
    if suffix_of(path) in (".nii", ".nii.gz"):
        return read_nifti(path, allow_nonfinite)
    require_utf8(path)
    if not allow_outside:
        confine_data_files(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size, comps = reader.GetSize(), reader.GetNumberOfComponents()
        if len(size) == 4 and size[3] == 1:
            size = size[:3]
        if len(size) not in (2, 3):
            raise DataError(f"{len(size)}D images are not supported (size {size})", shown(path))
        check_size(size[::-1], path, samples=comps)
        check_spacing(reader.GetSpacing()[:len(size)], path)
        img = reader.Execute()
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "Description" in ln or "ERROR" in ln.upper()), lines[-1]
                      if lines else "unknown error")
        raise DataError(f"unreadable {suffix_of(path)} image ({detail.split('Description:')[-1].strip()[:200]})",
                        shown(path)) from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    meta = {"source": path.name, "format": suffix_of(path).lstrip(".")}
    try:
        image = from_sitk(img, meta=meta)
    except (RuntimeError, ValueError, TypeError) as e:
        raise DataError(f"image data could not be converted ({type(e).__name__}: {e})", shown(path)) from None
    return _checked(image, path, allow_nonfinite)


def _checked(image: Image, path: Path, allow_nonfinite: bool) -> Image:
    check_finite(image.array, path, allow_nonfinite)
    check_spacing(image.spacing, path)
    return image


# -------------------------------------------------------------------- external data files (MHD, NRRD)


def _expand_data_file(value: str, rest: list[str]) -> list[str]:
    """File names from an MHD ``ElementDataFile`` / NRRD ``data file`` value: a name, LIST or a pattern."""
    tokens = value.split()
    if not tokens or tokens[0].upper() == "LOCAL":
        return []
    if tokens[0].upper() == "LIST":
        return [ln.strip() for ln in rest if ln.strip()]
    if "%" in tokens[0] and len(tokens) >= 4:  # printf pattern, min, max, step
        try:
            lo, hi, step = (int(t) for t in tokens[1:4])
            numbers = range(lo, hi + (1 if step > 0 else -1), step) if step else [lo]
            return [tokens[0] % i for i in list(numbers)[:100_000]]
        except (ValueError, TypeError):
            return [tokens[0]]
    return [value.strip()]


def data_files(path: str | Path) -> list[str]:
    """The data files an MHD (``ElementDataFile``) or NRRD (``data file``) header names, as written."""
    path = Path(path)
    sfx = suffix_of(path)
    if sfx not in (".mhd", ".mha", ".nrrd", ".nhdr"):
        return []
    with open(path, "rb") as f:
        text = f.read(1 << 20).decode("latin-1")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if sfx in (".mhd", ".mha"):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "elementdatafile":
                return _expand_data_file(value, lines[i + 1:])
        else:
            if not line.strip():
                return []  # the end of a NRRD header
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("data file", "datafile"):
                return _expand_data_file(value, lines[i + 1:])
    return []


def confine_data_files(path: str | Path) -> None:
    """Refuse a header whose data file resolves (symbolic links followed) outside the header's folder."""
    path = Path(path)
    folder = path.parent.resolve()
    for name in data_files(path):
        if not (path.parent / name).resolve().is_relative_to(folder):
            raise DataError(f"its data file '{shown(name)[:120]}' lies outside the header's folder; refused (pass "
                            "allow_outside=True, or --allow-outside, to read a header you trust)", shown(path))


def write_sitk(image: Image, path: str | Path, compress: bool = True) -> Path:
    """Write NIfTI / MHD+RAW / NRRD atomically (every file appears only when complete)."""
    path = Path(path)
    sfx = suffix_of(path)
    if sfx not in SITK_SUFFIXES:
        raise DataError(f"cannot write '{sfx}' with SimpleITK", shown(path))
    require_utf8(path, "output path")  # before anything is created: SimpleITK aborts on such a path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".medlens-") as tmp:
        tmp_path = Path(tmp) / path.name
        sitk.WriteImage(to_sitk(image), str(tmp_path), compress and sfx not in (".mhd",))
        for f in Path(tmp).iterdir():  # .mhd also wrote its .raw
            os.replace(f, path.parent / f.name)
    return path


def resample(image: Image, spacing, interpolator: str = "linear", default_value: float | None = None) -> Image:
    """Resample to a new spacing (array order, mm) on the same physical extent and orientation."""
    spacing = tuple(float(s) for s in (spacing if np.ndim(spacing) else [spacing] * image.spatial_dims))
    if len(spacing) != image.spatial_dims or not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"target spacing {spacing} does not fit a {image.spatial_dims}D image (one finite value > 0 "
                        "per axis)")
    new_size = [n * s / t for n, s, t in zip(image.shape, image.spacing, spacing)]
    check_size([max(1, round(v)) for v in new_size], f"resampled {image.meta.get('source', 'image')}",
               volume=image.spatial_dims == 3)
    src = to_sitk(image)
    new_xyz = tuple(reversed(spacing))
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(src.GetSize(), src.GetSpacing(), new_xyz)]
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline,
              "label": sitk.sitkLabelGaussian}[interpolator]
    fill = float(np.min(image.array)) if default_value is None else default_value
    out = sitk.Resample(src, size, sitk.Transform(), interp, src.GetOrigin(), new_xyz, src.GetDirection(), fill,
                        src.GetPixelID())
    return from_sitk(out, image.modality, image.meta)


def reorient(image: Image, orientation: str = "LPS") -> Image:
    """Reorient a volume so its axes follow ``orientation`` (DICOM LPS by default), exactly (no interpolation)."""
    if image.spatial_dims != 3:
        raise DataError("reorientation needs a 3D volume")
    out = sitk.DICOMOrient(to_sitk(image), orientation)
    return from_sitk(out, image.modality, image.meta)


def orientation_code(image: Image) -> str:
    """Three-letter orientation code (e.g. 'LPS') of a volume's index axes x, y, z."""
    if image.spatial_dims != 3:
        return "2D"
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in image.direction.ravel()])
