"""U-Net vessel segmentation on CHASE_DB1 against the human observer and the classical baseline.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/segmentation.py [--threads 2] [--run RUN_DIR]
    .venv/bin/python benchmarks/segmentation.py --quick          # smoke run: one short epoch, 2 test children

Trains ``configs/chasedb1_unet.yaml`` in this run with ``train.num_threads = --threads`` (or, with
``--run``, scores a finished run of it, named in the output with its date and config hash), then
scores every held-out test image now, all against the first observer: the U-Net (plain and with flip
TTA, through ``medlens.run.Predictor``), the second observer (the human reference) and Frangi / Sato
vesselness + threshold (the classical baseline of ``benchmarks/imaging.py``). Means over the test
images with 95% CIs by bootstrap over children.

No published figure is printed: published CHASE_DB1 U-Net scores use other splits and pool pixels over
the test set instead of averaging Dice per image, so the honest comparison measured here is the second
observer on the same images.

A second table times medlens's metrics against MONAI's (DiceMetric + HausdorffDistanceMetric +
SurfaceDistanceMetric) on the same masks.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from _common import REPO, add_common_args, for_benchmark, quick_banner, run_provenance, set_threads, torch_threads

warnings.filterwarnings("ignore")

DICE_BAR = 0.75   # issue 12's acceptance bar for configs/chasedb1_unet.yaml (mean test Dice), not a measurement


def _fmt(s: dict, k: str) -> str:
    v = s[k]
    return f"{v['value']:.3f} [{v['ci_low']:.3f}-{v['ci_high']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished run of configs/chasedb1_unet.yaml to score instead of "
                                             "training one now")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks")
    ap.add_argument("--bootstrap", type=int, default=1000)
    add_common_args(ap)
    args = ap.parse_args()
    quick_banner(args.quick, "one short epoch (none with --run), the first 2 test children scored")
    import numpy as np
    import torch
    from PIL import Image

    from medlens.config import load_config
    from medlens.evaluation.segmetrics import case_metrics, summarize
    from medlens.imaging.segment import frangi_vessels
    from medlens.run import Predictor, Run
    from medlens.transforms.preprocess import prepared_segmentation

    cfg_path = REPO / "configs" / "chasedb1_unet.yaml"
    wall = None
    if args.run is None:
        from medlens.workflow.train import train

        cfg = for_benchmark(load_config(cfg_path), args.threads, args.quick)
        t0 = time.time()
        run_dir = train(cfg, run_dir=args.out / (cfg.name + ("-quick" if args.quick else "")), overwrite=True,
                        progress_bar=False, log=lambda s: None)
        wall = time.time() - t0
        train_threads = torch_threads()   # what train() set and used
        origin = f"trained in this run ({cfg_path.relative_to(REPO)}, {run_dir})"
    else:
        run_dir = args.run
        train_threads = None
        origin = f"read from run folder {run_provenance(run_dir)}"
    run = Run.open(run_dir, expect="segmentation")
    meta, cfg = run.meta, run.config
    infer_threads = set_threads(args.threads)
    data = prepared_segmentation(cfg.data, cfg.segmentation, seed=cfg.seed)
    cases = data.test
    if args.quick:   # smoke run: the cases of the first two test children only
        keep = sorted({c.patient_id for c in cases})[:2]
        cases = [c for c in cases if c.patient_id in keep]
    groups = [c.patient_id for c in cases]
    val_children = sorted({c.patient_id for c in data.val})
    plain, tta = Predictor(run, tta=False), Predictor(run, tta=True)
    methods: dict[str, list[dict]] = {k: [] for k in ("U-Net (medlens)", "U-Net + flip TTA", "second observer",
                                                      "Frangi + threshold", "Sato + threshold")}
    preds = []
    for c in cases:
        ref = c.mask > 0
        t = time.perf_counter()
        pred = plain.labels(plain.segment_probs(c.image, c.case_id)) > 0
        methods["U-Net (medlens)"].append({**case_metrics(pred, ref, with_cldice=True), "s": time.perf_counter() - t})
        preds.append((pred, ref))
        t = time.perf_counter()
        pt = tta.labels(tta.segment_probs(c.image, c.case_id)) > 0
        methods["U-Net + flip TTA"].append({**case_metrics(pt, ref, with_cldice=True), "s": time.perf_counter() - t})
        if c.reference is not None:
            methods["second observer"].append({**case_metrics(c.reference > 0, ref, with_cldice=True),
                                               "s": float("nan")})
        rgb = np.asarray(Image.open(c.path).convert("RGB"))
        for name, how in (("Frangi + threshold", "frangi"), ("Sato + threshold", "sato")):
            t = time.perf_counter()
            _, m = frangi_vessels(rgb, method=how)
            methods[name].append({**case_metrics(m, ref, with_cldice=True), "s": time.perf_counter() - t})
    if not methods["second observer"]:
        del methods["second observer"]

    th = meta.threshold
    print(f"CHASE_DB1, {len(cases)} test images of {len(set(groups))} held-out children "
          f"({', '.join(sorted(set(groups)))})"
          + (f" (--quick: {len(data.test)} test images in all)" if len(cases) != len(data.test) else "")
          + f"; reference = first observer; 95% CIs by bootstrap over children ({args.bootstrap} resamples).")
    print(f"U-Net: {origin}.")
    secs = f"{meta.train_seconds / 60:.1f} min" if meta.train_seconds is not None else "? min"
    print(f"Training: {meta.epochs_run} epochs, {secs} train"
          + (f", {wall / 60:.1f} min with evaluation and report" if wall else "")
          + (f", {train_threads} torch threads" if train_threads else
             f", {(meta.environment or {}).get('threads', '?')} torch threads (recorded by that run)")
          + (f"; threshold {th.value:.2f} ({th.rule}) chosen on the {len(val_children)} validation children "
             f"({', '.join(val_children)})." if th else "; no threshold (argmax)."))
    print(f"Scoring now with {infer_threads} torch threads.\n")
    obs = summarize(methods["second observer"], groups, args.bootstrap) if "second observer" in methods else None
    print("| method | Dice [95% CI] | Dice / second observer | HD95 px [95% CI] | MSD px | clDice | s / image |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in methods.items():
        s = summarize(rows, groups, args.bootstrap)
        sec = np.nanmean([r["s"] for r in rows])
        rel = f"{s['dice']['value'] / obs['dice']['value']:.3f}x" if obs else "-"
        print(f"| {name} | {_fmt(s, 'dice')} | {rel} | {_fmt(s, 'hd95')} "
              f"| {s['msd']['value']:.2f} | {s['cldice']['value']:.3f} | {'-' if sec != sec else f'{sec:.2f}'} |")
    unet = summarize(methods["U-Net (medlens)"], groups, 0)["dice"]["value"]
    print(f"\nU-Net mean test Dice {unet:.3f}; issue 12 bar (mean Dice >= {DICE_BAR}, a target, not a "
          f"measurement): {'met' if unet >= DICE_BAR else 'NOT met'}")

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
    shapes = sorted({"x".join(map(str, p.shape)) for p, _ in preds})
    print(f"\n| metrics on {len(preds)} masks of {', '.join(shapes)} px (Dice, HD95, MSD; {torch_threads()} torch "
          f"threads) | s / image | ratio |\n|---|---|---|")
    print(f"| medlens case_metrics | {t_ours / len(preds):.3f} | {t_ours / t_mon:.2f}x |")
    print(f"| MONAI DiceMetric + HausdorffDistanceMetric + SurfaceDistanceMetric | {t_mon / len(preds):.3f} | 1.00x |")
    print(f"largest difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
