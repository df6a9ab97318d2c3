"""Classical image processing, each method scored on real data.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/imaging.py [--skip-baseline]

Tables: denoising (LIDC/LUNA16 CT slice + Gaussian noise sigma = 50 HU, PSNR/SSIM against the clean
slice); vessel segmentation on all 28 CHASE_DB1 images (Frangi and Sato + threshold, Dice against
the first observer, with the second observer as the human reference); lung-field segmentation of
the CT (volume, nodule inside); registration (a known rigid + affine transform of an MRI volume
recovered by affine Mattes-MI registration: TRE in voxels, lesion Dice before/after);
reconstruction (FBP and SART from a 180-angle sinogram; zero-filled 2x and 4x k-space); features
(shape vs independent computation, texture under 90-degree rotation); and the traditional
baseline (features + random forest) on PneumoniaMNIST beside the CNN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from medlens.imaging import scores
    from medlens.imaging.features import glcm, shape
    from medlens.io import load
    from medlens.utils import data_dir

    root = data_dir()
    ct = load(next((root / "luna16").glob("*.mhd")))
    sl = ct.array[90].astype(np.float64)

    print("Denoising: CT slice z=90 + Gaussian noise sigma=50 HU (noise level estimated blind)\n")
    print("| method | PSNR dB | gain vs noisy | SSIM | s |\n|---|---|---|---|---|")
    rows = scores.denoising(sl)
    base = rows[0]["psnr"]
    for r in rows:
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['psnr'] - base:+.2f} | {r['ssim']:.4f} | {r['seconds']:.2f} |")

    print("\nVessel segmentation, CHASE_DB1 (28 images), Dice against the first observer\n")
    from PIL import Image as PILImage

    from medlens.imaging.segment import frangi_vessels

    v = scores.vessels(root / "chasedb1" / "CHASEDB1")
    sato = []
    for img_path in sorted((root / "chasedb1" / "CHASEDB1").glob("Image_*.jpg")):
        rgb = np.asarray(PILImage.open(img_path).convert("RGB"))
        gt = np.asarray(PILImage.open(img_path.with_name(img_path.stem + "_1stHO.png"))) > 0
        sato.append(scores.dice(frangi_vessels(rgb, method="sato", sigmas=(1, 2, 3))[1], gt))
    f = np.array([r["frangi_dice"] for r in v])
    h = np.array([r["observer2_dice"] for r in v])
    print("| method | mean Dice | min | max | s / image |\n|---|---|---|---|---|")
    print(f"| Frangi (sigma 2-5) + top-10% threshold | {f.mean():.3f} | {f.min():.3f} | {f.max():.3f} "
          f"| {np.mean([r['seconds'] for r in v]):.2f} |")
    print(f"| Sato (sigma 1-3) + top-10% threshold | {np.mean(sato):.3f} | {np.min(sato):.3f} | {np.max(sato):.3f} | - |")
    print(f"| second human observer (reference) | {h.mean():.3f} | {h.min():.3f} | {h.max():.3f} | - |")

    lung = scores.lungs(ct, (56.20840547, 86.34341278, -115.8675792))
    print(f"\nLung fields (LUNA16 scan): {lung['lung_volume_l']:.2f} L, LUNA16 nodule centre inside the mask: "
          f"{lung['nodule_inside']}, {lung['seconds']:.1f} s")

    reg = scores.registration(load(root / "mri-seg" / "brain1_image.nrrd"), load(root / "mri-seg" / "brain1_label.nrrd"))
    print(f"\nRegistration (brain1 MRI, known rotation 6 deg + scale/shear + translation (4,-3,2) mm, affine Mattes MI): "
          f"mean TRE {reg['tre_voxels']:.3f} voxels over the lesion; lesion Dice {reg['dice_before']:.3f} -> "
          f"{reg['dice_after']:.3f}; {reg['seconds']:.1f} s")

    print("\nReconstruction (CT slice z=90 at 256x256, 180 angles)\n")
    print("| method | RMSE HU | SSIM | PSNR dB | s |\n|---|---|---|---|---|")
    for r in scores.reconstruction(sl[::2, ::2]):
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
        print(f"| {name} | {sh['volume_mm3']:.1f} | {m.array.sum() * np.prod(m.spacing):.1f} | {sh['max_diameter_mm']:.2f} "
              f"| {brute:.2f} | {g0:.4f} | {g1:.4f} |")

    if not args.skip_baseline:
        from medlens.config import load_config
        from medlens.workflow.train import train

        cfg = load_config(REPO / "configs" / "pneumoniamnist_rf.yaml")
        t0 = time.time()
        run = train(cfg, run_dir=REPO / "runs" / "benchmarks" / cfg.name, overwrite=True, progress_bar=False,
                    log=lambda s: None)
        wall = time.time() - t0
        rf = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
        cnn_path = REPO / "runs" / "benchmarks" / "pneumoniamnist_cnn" / "metrics.json"
        print("\nTraditional vs deep learning, PneumoniaMNIST test (n=624)\n")
        print("| model | AUC [95% CI] | ACC (MedMNIST) | wall time |\n|---|---|---|---|")
        print(f"| features + random forest | {rf['auc']['value']:.3f} [{rf['auc']['ci_low']:.3f}-{rf['auc']['ci_high']:.3f}] "
              f"| {rf['medmnist_acc']['value']:.3f} | {wall / 60:.1f} min |")
        if cnn_path.exists():
            cnn = json.loads(cnn_path.read_text())["test"]["metrics"]
            print(f"| small CNN (pneumoniamnist_cnn.yaml, from benchmarks/medmnist.py) | {cnn['auc']['value']:.3f} "
                  f"[{cnn['auc']['ci_low']:.3f}-{cnn['auc']['ci_high']:.3f}] | {cnn['medmnist_acc']['value']:.3f} | - |")


if __name__ == "__main__":
    main()
