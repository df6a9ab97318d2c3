"""U-Net vessel segmentation on CHASE_DB1 against the human observer and the classical baseline.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/segmentation.py [--run RUN_DIR]

Trains ``configs/chasedb1_unet.yaml`` (unless ``--run`` names a finished run of it), then scores on
the held-out children, all against the first observer: the U-Net (plain and with flip TTA), the
second observer (the human reference) and Frangi / Sato vesselness + threshold (the classical
baseline of ``benchmarks/imaging.py``). Means over the test images with 95% CIs by bootstrap over
children. A second table times medlens's metrics against MONAI's (DiceMetric +
HausdorffDistanceMetric + SurfaceDistanceMetric) on the same masks.
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

PUBLISHED_UNET_F1 = 0.80  # U-Nets on CHASE_DB1 in the literature (e.g. R2U-Net / LadderNet tables), F1 = Dice


def _fmt(s: dict, k: str) -> str:
    v = s[k]
    return f"{v['value']:.3f} [{v['ci_low']:.3f}-{v['ci_high']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing run of configs/chasedb1_unet.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    from medlens.config import load_config
    from medlens.transforms.preprocess import prepared_segmentation
    from medlens.engine.predict import load_run_model
    from medlens.evaluation.segmentation import infer_case, to_labels
    from medlens.evaluation.segmetrics import case_metrics, summarize
    from medlens.imaging.segment import frangi_vessels

    cfg_path = REPO / "configs" / "chasedb1_unet.yaml"
    wall = None
    if args.run is None:
        from medlens.workflow.train import train

        t0 = time.time()
        run = train(load_config(cfg_path), run_dir=args.out / "chasedb1_unet", overwrite=True, progress_bar=False,
                    log=lambda s: None)
        wall = time.time() - t0
    else:
        run = args.run
    net, meta = load_run_model(run)
    cfg = load_config(run / "config.yaml")
    torch.set_num_threads(torch.get_num_threads())
    data = prepared_segmentation(cfg.data, cfg.segmentation, seed=cfg.seed)
    cases = data.test
    groups = [c.patient_id for c in cases]
    methods: dict[str, list[dict]] = {k: [] for k in ("U-Net (medlens)", "U-Net + flip TTA", "second observer",
                                                      "Frangi + threshold", "Sato + threshold")}
    preds = []
    for c in cases:
        ref = c.mask > 0
        t = time.perf_counter()
        pred = to_labels(infer_case(net, c.image, meta, c.case_id), meta) > 0
        methods["U-Net (medlens)"].append({**case_metrics(pred, ref, with_cldice=True), "s": time.perf_counter() - t})
        preds.append((pred, ref))
        t = time.perf_counter()
        tta_meta = {**meta, "segmentation": {**meta["segmentation"], "tta": True}}
        pt = to_labels(infer_case(net, c.image, tta_meta, c.case_id), meta) > 0
        methods["U-Net + flip TTA"].append({**case_metrics(pt, ref, with_cldice=True), "s": time.perf_counter() - t})
        methods["second observer"].append({**case_metrics(c.reference > 0, ref, with_cldice=True), "s": float("nan")})
        rgb = np.asarray(Image.open(c.path).convert("RGB"))
        for name, how in (("Frangi + threshold", "frangi"), ("Sato + threshold", "sato")):
            t = time.perf_counter()
            _, m = frangi_vessels(rgb, method=how)
            methods[name].append({**case_metrics(m, ref, with_cldice=True), "s": time.perf_counter() - t})

    tr = json.loads((run / "run.json").read_text())
    print(f"CHASE_DB1, {len(cases)} test images of {len(set(groups))} held-out children "
          f"({', '.join(sorted(set(groups)))}); reference = first observer; 95% CIs by bootstrap over children.")
    print(f"Training (configs/chasedb1_unet.yaml, {tr['epochs_run']} epochs, 2 CPU threads): "
          f"{tr['train_seconds'] / 60:.1f} min train"
          + (f", {wall / 60:.1f} min with evaluation and report" if wall else "")
          + f"; threshold {tr['threshold']:.2f} chosen on the 2 validation children.\n")
    obs = summarize(methods["second observer"], groups, 1000)
    print("| method | Dice [95% CI] | Dice / observer | HD95 px [95% CI] | MSD px | clDice | s / image |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in methods.items():
        s = summarize(rows, groups, 1000)
        sec = np.nanmean([r["s"] for r in rows])
        print(f"| {name} | {_fmt(s, 'dice')} | {s['dice']['value'] / obs['dice']['value']:.3f}x | {_fmt(s, 'hd95')} "
              f"| {s['msd']['value']:.2f} | {s['cldice']['value']:.3f} | {'-' if sec != sec else f'{sec:.2f}'} |")
    unet = summarize(methods["U-Net (medlens)"], groups, 0)["dice"]["value"]
    print(f"| published U-Nets (literature, other splits) | ~{PUBLISHED_UNET_F1:.2f} F1 | "
          f"{PUBLISHED_UNET_F1 / obs['dice']['value']:.3f}x | - | - | - | - |")
    print(f"\nmedlens U-Net / published U-Net: {unet / PUBLISHED_UNET_F1:.3f}x; bar (mean Dice >= 0.75): "
          f"{'met' if unet >= 0.75 else 'NOT met'}")

    # metrics: medlens vs MONAI on the same masks
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    oh = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    t = time.perf_counter()
    ours = [case_metrics(p, r) for p, r in preds]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    mon = [(DiceMetric(include_background=False)(oh(p), oh(r)).item(),
            HausdorffDistanceMetric(include_background=False, percentile=95)(oh(p), oh(r)).item(),
            SurfaceDistanceMetric(include_background=False, symmetric=True)(oh(p), oh(r)).item()) for p, r in preds]
    t_mon = time.perf_counter() - t
    diff = max(max(abs(o["dice"] - m[0]), abs(o["hd95"] - m[1]), abs(o["msd"] - m[2])) for o, m in zip(ours, mon))
    print(f"\n| metrics on {len(preds)} 960x999 masks (Dice, HD95, MSD) | s / image | ratio |\n|---|---|---|")
    print(f"| medlens case_metrics | {t_ours / len(preds):.3f} | {t_ours / t_mon:.2f}x |")
    print(f"| MONAI DiceMetric + HausdorffDistanceMetric + SurfaceDistanceMetric | {t_mon / len(preds):.3f} | 1.00x |")
    print(f"largest difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
