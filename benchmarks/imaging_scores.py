"""Real-data scores of the classical toolkit, shared by ``benchmarks/imaging.py`` and ``tests/integration/test_imaging.py``
(benchmark scoring: it lives beside the benchmarks, outside the library)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medlens.evaluation.segmetrics import dice


def psnr_ssim(clean: np.ndarray, test: np.ndarray, data_range: float) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (float(peak_signal_noise_ratio(clean, test, data_range=data_range)),
            float(structural_similarity(clean, test, data_range=data_range)))


def denoising(ct_slice: np.ndarray, sigma: float = 50.0, seed: int = 0) -> list[dict]:
    """Gaussian noise of ``sigma`` HU added to a CT slice; each denoiser (blind: noise estimated) scored."""
    from medlens.imaging import denoise, filters

    clean = ct_slice.astype(np.float64)
    noisy = clean + np.random.default_rng(seed).normal(0, sigma, clean.shape)
    rng_ = float(clean.max() - clean.min())
    rows = [{"method": "noisy input", **dict(zip(("psnr", "ssim"), psnr_ssim(clean, noisy, rng_))), "seconds": 0.0}]
    for name, fn in (("median 3x3", lambda a: denoise.median(a, 3)), ("Gaussian sigma=1", lambda a: filters.gaussian(a, 1.0)),
                     ("bilateral", lambda a: filters.bilateral(a, 1.5, 3 * sigma)),
                     ("anisotropic diffusion", lambda a: filters.anisotropic_diffusion(a, 10)),
                     ("wavelet BayesShrink", lambda a: denoise.wavelet(a, "BayesShrink")),
                     ("wavelet VisuShrink", lambda a: denoise.wavelet(a, "VisuShrink")),
                     ("non-local means", denoise.nlm), ("total variation", denoise.total_variation)):
        t0 = time.perf_counter()
        out = np.asarray(fn(noisy), np.float64)
        p, s = psnr_ssim(clean, out, rng_)
        rows.append({"method": name, "psnr": p, "ssim": s, "seconds": time.perf_counter() - t0})
    return rows


def vessels(chase_dir: Path, children: tuple[str, ...] | None = None) -> list[dict]:
    """Frangi + threshold on every CHASE_DB1 image (or those of ``children``, e.g. ("01", "07")): Dice against
    the first observer, and the second observer's Dice against the first (the human reference)."""
    from PIL import Image as PILImage

    from medlens.imaging.segment import frangi_vessels

    rows = []
    for img_path in sorted(Path(chase_dir).glob("Image_*.jpg")):
        if children is not None and img_path.stem[6:8] not in children:
            continue
        rgb = np.asarray(PILImage.open(img_path).convert("RGB"))
        gt1 = np.asarray(PILImage.open(img_path.with_name(img_path.stem + "_1stHO.png"))) > 0
        gt2 = np.asarray(PILImage.open(img_path.with_name(img_path.stem + "_2ndHO.png"))) > 0
        t0 = time.perf_counter()
        _, mask = frangi_vessels(rgb)
        rows.append({"image": img_path.stem, "frangi_dice": dice(mask, gt1), "observer2_dice": dice(gt2, gt1),
                     "seconds": time.perf_counter() - t0})
    return rows


def lungs(ct, nodule_world) -> dict:
    from medlens.imaging.segment import lung_mask

    t0 = time.perf_counter()
    m = lung_mask(ct)
    vol_l = float(m.sum() * np.prod(ct.spacing) / 1e6)
    z, y, x = np.round(ct.world_to_voxel(nodule_world)).astype(int)
    return {"lung_volume_l": vol_l, "nodule_inside": bool(m[z, y, x]), "seconds": time.perf_counter() - t0,
            "mask": m}


def registration(image, mask, seed: int = 0, sampling: float = 0.2) -> dict:
    """A known rigid + affine transform is applied to a real MRI volume; affine registration must
    recover it. TRE is measured at the mask's voxels (and the volume's corners) in voxels."""
    import SimpleITK as sitk

    from medlens.imaging.register import register
    from medlens.io.sitk_io import from_sitk, to_sitk

    fixed = image.with_array(image.array.astype(np.float32))
    f = to_sitk(fixed)
    center = f.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in f.GetSize()])
    truth = sitk.AffineTransform(3)
    truth.SetCenter(center)
    ang = np.deg2rad(6.0)
    rot = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    aff = rot @ np.array([[1.04, 0.02, 0], [0.0, 0.97, 0.0], [0, 0, 1.0]])
    truth.SetMatrix(aff.ravel().tolist())
    truth.SetTranslation([4.0, -3.0, 2.0])
    moving_s = sitk.Resample(f, f, truth.GetInverse(), sitk.sitkLinear, 0.0)
    moving = from_sitk(moving_s, image.modality)
    mask_moving = from_sitk(sitk.Resample(to_sitk(mask.with_array(mask.array.astype(np.uint8))), f, truth.GetInverse(),
                                          sitk.sitkNearestNeighbor, 0), "SEG")
    t0 = time.perf_counter()
    reg = register(fixed, moving, "affine", iterations=300, sampling=sampling, seed=seed)
    secs = time.perf_counter() - t0
    pts_idx = np.argwhere(mask.array > 0)
    if len(pts_idx) > 2000:
        pts_idx = pts_idx[np.random.default_rng(seed).choice(len(pts_idx), 2000, replace=False)]
    world = fixed.voxel_to_world(pts_idx)
    err = []
    for w in world:
        true_m = np.array(truth.TransformPoint(w.tolist()))  # moving(truth(w)) == fixed(w)
        est_m = np.array(reg.transform.TransformPoint(w.tolist()))
        err.append(np.abs(moving.world_to_voxel(true_m) - moving.world_to_voxel(est_m)))
    err = np.array(err)
    tre_vox = float(np.sqrt((err ** 2).sum(1)).mean())
    recovered_mask = reg.apply(mask_moving, fixed, mask=True)
    before = dice(mask_moving.array > 0, mask.array > 0)
    after = dice(recovered_mask.array > 0, mask.array > 0)
    return {"tre_voxels": tre_vox, "dice_before": before, "dice_after": after, "seconds": secs}


def reconstruction(ct_slice: np.ndarray, n_angles: int = 180) -> list[dict]:
    from medlens.imaging.reconstruct import fbp, forward_project, sart, undersampled_recon

    clean = np.maximum(ct_slice.astype(np.float64), -1024.0)  # padding outside the scan circle is not tissue
    offset = -1024.0
    img = clean - offset  # attenuation-like, non-negative
    sino, theta = forward_project(img, n_angles)
    rows = []
    rng_ = float(clean.max() - clean.min())
    for name, fn in (("FBP (ramp)", lambda: fbp(sino, theta, img.shape[0])), ("SART (2 iterations)", lambda: sart(sino, theta, 2, img.shape[0]))):
        t0 = time.perf_counter()
        rec = fn() + offset
        rec = rec[: clean.shape[0], : clean.shape[1]]
        p, s = psnr_ssim(clean, rec, rng_)
        rows.append({"method": name, "rmse_hu": float(np.sqrt(((rec - clean) ** 2).mean())), "ssim": s, "psnr": p,
                     "seconds": time.perf_counter() - t0})
    for acc in (2, 4):
        t0 = time.perf_counter()
        rec, lines = undersampled_recon(img, acc)
        rec = rec + offset
        p, s = psnr_ssim(clean, rec, rng_)
        rows.append({"method": f"MRI k-space {acc}x undersampled, zero-filled ({lines.mean():.0%} lines)",
                     "rmse_hu": float(np.sqrt(((rec - clean) ** 2).mean())), "ssim": s, "psnr": p,
                     "seconds": time.perf_counter() - t0})
    return rows
