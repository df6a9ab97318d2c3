"""MHD/RAW, NRRD and NIfTI through SimpleITK, and conversion between ``Image`` and ``sitk.Image``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.errors import DataError
from medlens.io.image import Image

SITK_SUFFIXES = {".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".hdr", ".img"}


def to_sitk(image: Image):
    """``Image`` -> ``SimpleITK.Image`` with the same grid (2D images stay 2D)."""
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(image.array), isVector=image.is_rgb)
    out.SetSpacing([float(s) for s in image.spacing_xyz])
    out.SetOrigin([float(o) for o in image.origin])
    out.SetDirection([float(d) for d in np.asarray(image.direction).ravel()])
    return out


def from_sitk(img, modality: str = "OT", meta: dict | None = None) -> Image:
    """``SimpleITK.Image`` -> ``Image`` ((z, y, x) array, spacing in array order)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    rgb = img.GetNumberOfComponentsPerPixel() == 3
    return Image(arr, spacing=tuple(reversed(img.GetSpacing())), origin=tuple(img.GetOrigin()),
                 direction=np.array(img.GetDirection()).reshape(nd, nd), modality=modality, meta=dict(meta or {}),
                 is_rgb=rgb)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_nifti(path: Path) -> Image:
    """NIfTI through nibabel (SimpleITK silently turns NaN voxels into 0); RAS affine -> LPS geometry."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, float)
    except Exception as e:
        raise DataError(f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:200]})", path) from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"{arr.ndim}D NIfTI images are not supported (shape {arr.shape})", path)
    nd = arr.ndim
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    spacing_xyz = np.linalg.norm(lps, axis=0)
    if np.any(spacing_xyz[:nd] <= 0) or not np.all(np.isfinite(lps)):
        raise DataError("NIfTI affine is singular or not finite", path)
    direction = lps / spacing_xyz
    arr = np.ascontiguousarray(arr.transpose(tuple(range(nd))[::-1]))  # (x, y, z) -> (z, y, x)
    if nd == 2:
        return Image(arr, spacing=tuple(spacing_xyz[:2][::-1]), origin=tuple(origin[:2]),
                     direction=direction[:2, :2], meta={"source": path.name, "format": "nifti"})
    return Image(arr, spacing=tuple(spacing_xyz[::-1]), origin=tuple(origin), direction=direction,
                 meta={"source": path.name, "format": "nifti"})


def read_sitk(path: str | Path, allow_nonfinite: bool = False) -> Image:
    """Read MHD/RAW, NRRD (SimpleITK) or NIfTI (nibabel). Non-finite voxels are an error unless ``allow_nonfinite``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", path)
    if _suffix(path) in (".nii", ".nii.gz"):
        return _check_finite(read_nifti(path), path, allow_nonfinite)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "Description" in ln or "ERROR" in ln.upper()), lines[-1]
                      if lines else "unknown error")
        raise DataError(f"unreadable {_suffix(path)} image ({detail.split('Description:')[-1].strip()[:200]})",
                        path) from None
    except Exception as e:
        raise DataError(f"unreadable image ({type(e).__name__}: {e})", path) from None
    if img.GetDimension() not in (2, 3) and not (img.GetDimension() == 4 and img.GetSize()[3] == 1):
        raise DataError(f"{img.GetDimension()}D images are not supported (size {img.GetSize()})", path)
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    meta = {"source": path.name, "format": _suffix(path).lstrip(".")}
    try:
        image = from_sitk(img, meta=meta)
    except Exception as e:
        raise DataError(f"image data could not be converted ({type(e).__name__}: {e})", path) from None
    return _check_finite(image, path, allow_nonfinite)


def _check_finite(image: Image, path: Path, allow_nonfinite: bool) -> Image:
    if np.issubdtype(image.array.dtype, np.floating):
        bad = int((~np.isfinite(image.array)).sum())
        if bad and not allow_nonfinite:
            what = "every voxel" if bad == image.array.size else f"{bad} of {image.array.size} voxels"
            raise DataError(f"{what} is NaN or infinite (pass allow_nonfinite=True to load anyway)", path)
    if not np.all(np.isfinite(image.spacing)) or min(image.spacing) <= 0:
        raise DataError(f"invalid voxel spacing {image.spacing}", path)
    return image


def write_sitk(image: Image, path: str | Path, compress: bool = True) -> Path:
    """Write NIfTI / MHD+RAW / NRRD atomically (every file appears only when complete)."""
    import os
    import tempfile

    import SimpleITK as sitk

    path = Path(path)
    sfx = _suffix(path)
    if sfx not in SITK_SUFFIXES:
        raise DataError(f"cannot write '{sfx}' with SimpleITK", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".medlens-") as tmp:
        tmp_path = Path(tmp) / path.name
        sitk.WriteImage(to_sitk(image), str(tmp_path), compress and sfx not in (".mhd",))
        for f in Path(tmp).iterdir():  # .mhd also wrote its .raw
            os.replace(f, path.parent / f.name)
    return path


def resample(image: Image, spacing, interpolator: str = "linear", default_value: float | None = None) -> Image:
    """Resample to a new spacing (array order, mm) on the same physical extent and orientation."""
    import SimpleITK as sitk

    spacing = tuple(float(s) for s in (spacing if np.ndim(spacing) else [spacing] * image.spatial_dims))
    if len(spacing) != image.spatial_dims or min(spacing) <= 0:
        raise DataError(f"target spacing {spacing} does not fit a {image.spatial_dims}D image")
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
    import SimpleITK as sitk

    if image.spatial_dims != 3:
        raise DataError("reorientation needs a 3D volume")
    out = sitk.DICOMOrient(to_sitk(image), orientation)
    return from_sitk(out, image.modality, image.meta)


def orientation_code(image: Image) -> str:
    """Three-letter orientation code (e.g. 'LPS') of a volume's index axes x, y, z."""
    import SimpleITK as sitk

    if image.spatial_dims != 3:
        return "2D"
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in image.direction.ravel()])
