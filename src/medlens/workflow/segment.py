"""``medlens segment``: masks for new files with a trained segmentation run, in each input's geometry."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medlens.errors import MedlensWarning
from medlens.evaluation.segmentation import mask_name, write_mask, write_overlay
from medlens.io.dicom_seg import codes_from_config, write_dicom_seg
from medlens.run import Predictor, Run
from medlens.run.profile import require_in_profile
from medlens.transforms.preprocess import display_image
from medlens.utils import atomic_dir, unique_stems


def segment_files(run: Run | str | Path, files: Sequence[str | Path], out_dir: str | Path, tta: bool | None = None,
                  overlay: bool = True, dicom_seg: bool = False, allow_out_of_profile: bool = False) -> list[dict]:
    """Segment image files (or DICOM series folders): a mask in each input's geometry, an overlay PNG and,
    with ``dicom_seg``, a DICOM SEG for DICOM series inputs. The output folder appears only when complete;
    inputs that share a name get distinct outputs (``x``, ``x-2``). An input outside the run's training
    profile is segmented with a warning; with ``dicom_seg`` it is refused before anything is written
    (``run.profile.OutOfProfile``), unless ``allow_out_of_profile``."""
    run = run if isinstance(run, Run) else Run.open(run, expect="segmentation")
    predictor = Predictor(run, tta=tta)
    paths = [Path(f) for f in files]
    images = [predictor.load(f) for f in paths]  # read everything first: bad input fails before any write
    inputs = [predictor.prepare(img, str(f)) for img, f in zip(images, paths)]
    for f, img, x in zip(paths, images, inputs):  # issue 26: checked on the training profile before any write
        reasons = predictor.input_warnings(img, x)
        if dicom_seg:
            require_in_profile(reasons, f, allow_out_of_profile)
        if reasons:
            warnings.warn(f"{f}: outside the training inputs ({'; '.join(reasons)}): treat the mask with caution",
                          MedlensWarning, stacklevel=2)
    final = Path(out_dir)
    results = []
    with atomic_dir(final) as out:
        for f, stem, img, x in zip(paths, unique_stems(paths), images, inputs):
            pred = predictor.labels(predictor.segment_probs(x, f.name))  # warns when it pads
            geometry = img.with_array(np.zeros(img.shape, np.uint8), is_rgb=False)
            mpath = write_mask(pred, geometry, out / mask_name(stem, x.ndim - 1), run.meta)
            row = {"file": str(f), "mask": str(final / mpath.name), "foreground_voxels": int((pred > 0).sum())}
            if x.ndim == 4 or run.meta.preprocessing.pixel_spacing:
                row["foreground_mm3" if x.ndim == 4 else "foreground_mm2"] = float(
                    (pred > 0).sum() * np.prod(img.spacing))
            if dicom_seg:
                if "series_uid" not in img.meta or not f.is_dir():
                    warnings.warn(f"{f.name} is not a DICOM series folder; no DICOM SEG written", MedlensWarning)
                else:
                    codes = codes_from_config(run.config.segmentation.dicom_codes, len(run.class_names) - 1)
                    seg = write_dicom_seg(pred, geometry, f, out / f"{stem}_seg.dcm", run.class_names, codes=codes)
                    row["dicom_seg"] = str(final / Path(seg).name)
            if overlay:
                ov = write_overlay(display_image(img, predictor.spec), pred, None, out / f"{stem}_overlay.png")
                row["overlay"] = str(final / ov.name)
            results.append(row)
    return results
