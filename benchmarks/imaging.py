"""Classical image processing, each method scored on real data.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/imaging.py [--skip-baseline] [--threads 2]
    .venv/bin/python benchmarks/imaging.py --quick        # smoke run: small baseline training

Tables: denoising (LIDC/LUNA16 CT slice + Gaussian noise, PSNR/SSIM against the clean slice); vessel
segmentation on every CHASE_DB1 image (Frangi and Sato + threshold, Dice against the first observer,
with the second observer as the human reference); lung-field segmentation of the CT (volume, the
LUNA16 nodule of ``annotations.csv`` inside); registration (a known rigid + affine transform of an
MRI volume recovered by affine Mattes-MI registration: TRE in voxels, lesion Dice before/after);
reconstruction (FBP and SART from a sinogram; zero-filled 2x and 4x k-space); features (shape vs
independent computation, texture under 90-degree rotation); and the traditional baseline (features +
random forest) beside the small CNN on PneumoniaMNIST, both trained in this run on the same split
(the CNN with ``train.num_threads = --threads``; the forest uses every CPU, scikit-learn ``n_jobs=-1``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import warnings

from _common import REPO, add_common_args, for_benchmark, quick_banner, torch_threads  # sets the import path

import imaging_scores as scores  # noqa: E402  (benchmark-only scoring, beside this script)

warnings.filterwarnings("ignore")

CT_SLICE = 90          # axial slice of the LUNA16 scan used for denoising and reconstruction
NOISE_SIGMA_HU = 50.0
N_ANGLES = 180
FRANGI_SIGMAS = (2, 3, 4, 5)   # frangi_vessels' default, which imaging_scores.vessels uses
SATO_SIGMAS = (1, 2, 3)


def _train_baselines(threads: int, quick: bool) -> None:
    """Traditional vs deep learning: both models trained now, on the same data, at the same thread count."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from medlens.config import load_config
    from medlens.workflow.train import train

    rows, ns = [], set()
    for label, cfg_name, torch_model in (("features + random forest", "pneumoniamnist_rf.yaml", False),
                                         ("small CNN", "pneumoniamnist_cnn.yaml", True)):
        cfg = for_benchmark(load_config(REPO / "configs" / cfg_name), threads, quick)
        t0 = time.time()
        run = train(cfg, run_dir=REPO / "runs" / "benchmarks" / f"imaging_{cfg.name}{'-quick' if quick else ''}",
                    overwrite=True, progress_bar=False, log=lambda s: None)
        wall = time.time() - t0
        m = json.loads((run / "metrics.json").read_text())["test"]
        ns.add(m["n"])
        auc = m["metrics"]["auc"]
        rows.append(f"| {label} ({cfg_name}) | {auc['value']:.3f} [{auc['ci_low']:.3f}-{auc['ci_high']:.3f}] "
                    f"| {m['metrics']['medmnist_acc']['value']:.3f} | {wall / 60:.1f} min "
                    f"| {f'{torch_threads()} torch' if torch_model else f'{os.cpu_count()} (scikit-learn n_jobs=-1)'} |")
    n = ", ".join(map(str, sorted(ns)))
    print(f"\nTraditional vs deep learning, PneumoniaMNIST test (n={n}), both trained in this run\n")
    print("| model | AUC [95% CI] | ACC (MedMNIST) | wall time | threads |\n|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-baseline", action="store_true", help="skip the RF vs CNN training")
    add_common_args(ap)
    args = ap.parse_args()
    quick_banner(args.quick)
    import numpy as np
    from PIL import Image as PILImage

    from medlens.imaging.features import glcm, shape
    from medlens.imaging.segment import frangi_vessels
    from medlens.io import load
    from medlens.utils import data_dir

    root = data_dir()
    mhd = next((root / "luna16").glob("*.mhd"))
    ct = load(mhd)
    sl = ct.array[CT_SLICE].astype(np.float64)

    print(f"Denoising: CT slice z={CT_SLICE} ({'x'.join(map(str, sl.shape))}) + Gaussian noise "
          f"sigma={NOISE_SIGMA_HU:g} HU (noise level estimated blind)\n")
    print("| method | PSNR dB | gain vs noisy | SSIM | s |\n|---|---|---|---|---|")
    rows = scores.denoising(sl, sigma=NOISE_SIGMA_HU)
    base = rows[0]["psnr"]
    for r in rows:
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['psnr'] - base:+.2f} | {r['ssim']:.4f} | {r['seconds']:.2f} |")

    chase = root / "chasedb1" / "CHASEDB1"
    v = scores.vessels(chase)
    sato = []
    for img_path in sorted(chase.glob("Image_*.jpg")):
        rgb = np.asarray(PILImage.open(img_path).convert("RGB"))
        gt = np.asarray(PILImage.open(img_path.with_name(img_path.stem + "_1stHO.png"))) > 0
        sato.append(scores.dice(frangi_vessels(rgb, method="sato", sigmas=SATO_SIGMAS)[1], gt))
    print(f"\nVessel segmentation, CHASE_DB1 ({len(v)} images), Dice against the first observer\n")
    f = np.array([r["frangi_dice"] for r in v])
    h = np.array([r["observer2_dice"] for r in v])
    print("| method | mean Dice | min | max | s / image |\n|---|---|---|---|---|")
    print(f"| Frangi (sigma {FRANGI_SIGMAS[0]}-{FRANGI_SIGMAS[-1]}) + top-10% threshold | {f.mean():.3f} | {f.min():.3f} "
          f"| {f.max():.3f} | {np.mean([r['seconds'] for r in v]):.2f} |")
    print(f"| Sato (sigma {SATO_SIGMAS[0]}-{SATO_SIGMAS[-1]}) + top-10% threshold | {np.mean(sato):.3f} | "
          f"{np.min(sato):.3f} | {np.max(sato):.3f} | - |")
    print(f"| second human observer (reference) | {h.mean():.3f} | {h.min():.3f} | {h.max():.3f} | - |")

    with open(root / "luna16" / "annotations.csv", newline="") as fh:
        nodules = [r for r in csv.DictReader(fh) if r["seriesuid"] == mhd.stem]
    if nodules:
        world = tuple(float(nodules[0][k]) for k in ("coordX", "coordY", "coordZ"))
        lung = scores.lungs(ct, world)
        print(f"\nLung fields (LUNA16 scan {'x'.join(map(str, ct.array.shape))}): {lung['lung_volume_l']:.2f} L; "
              f"nodule of annotations.csv at ({', '.join(f'{c:.1f}' for c in world)}) mm inside the mask: "
              f"{lung['nodule_inside']}; {lung['seconds']:.1f} s")

    reg = scores.registration(load(root / "mri-seg" / "brain1_image.nrrd"), load(root / "mri-seg" / "brain1_label.nrrd"))
    print("\nRegistration (brain1 MRI, the known transform of imaging_scores.registration: rotation 6 deg + scale/shear + "
          f"translation (4,-3,2) mm; affine Mattes MI): mean TRE {reg['tre_voxels']:.3f} voxels over the lesion; "
          f"lesion Dice {reg['dice_before']:.3f} -> {reg['dice_after']:.3f}; {reg['seconds']:.1f} s")

    half = sl[::2, ::2]
    print(f"\nReconstruction (CT slice z={CT_SLICE} at {'x'.join(map(str, half.shape))}, {N_ANGLES} angles)\n")
    print("| method | RMSE HU | SSIM | PSNR dB | s |\n|---|---|---|---|---|")
    for r in scores.reconstruction(half, n_angles=N_ANGLES):
        print(f"| {r['method']} | {r['rmse_hu']:.1f} | {r['ssim']:.4f} | {r['psnr']:.2f} | {r['seconds']:.2f} |")

    print("\nFeatures\n")
    print("| mask | volume (medlens) mm3 | voxels x voxel volume | max diameter (medlens) | brute force | "
          "GLCM contrast | after 90-degree rotation |\n|---|---|---|---|---|---|---|")
    for name in ("brain1", "brain2", "breast1"):
        img = load(root / "mri-seg" / f"{name}_image.nrrd")
        m = load(root / "mri-seg" / f"{name}_label.nrrd")
        m = m.with_array(m.array > 0)
        sh = shape(m)
        pts = np.argwhere(m.array) * np.array(m.spacing)
        brute = float(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()) if len(pts) < 6000 else float("nan")
        k = int(np.argmax(m.array.sum((1, 2))))
        g0 = glcm(img.array[k], m.array[k])["glcm_contrast"]
        g1 = glcm(np.rot90(img.array[k]), np.rot90(m.array[k]))["glcm_contrast"]
        brute_s = f"{brute:.2f}" if brute == brute else f"- ({len(pts)} voxels, too many)"
        print(f"| {name} | {sh['volume_mm3']:.1f} | {m.array.sum() * np.prod(m.spacing):.1f} | {sh['max_diameter_mm']:.2f} "
              f"| {brute_s} | {g0:.4f} | {g1:.4f} |")

    if not args.skip_baseline:
        _train_baselines(args.threads, args.quick)


if __name__ == "__main__":
    main()
