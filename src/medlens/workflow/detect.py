"""``medlens nodules detect``: whole chest CTs -> nodule candidates (LUNA16 CSV), DICOM SR measurement groups and a
gallery, and, given the LUNA16 annotations, the FROC of the result.

Two stages:

1. candidates: a Hounsfield-unit check (a volume that is not a CT is refused in one line), the lung mask
   (``imaging.segment.lung_mask``), multi-scale 3D LoG blobs inside it (``imaging.nodules.nodule_candidates``;
   why blobs and not a detection network: see that module);
2. false-positive reduction: a trained patch classifier, a medlens run (the seed nodule CNN on 50x50 axial HU
   patches, or a 3D patch CNN), opened with ``Run.open``; each candidate's patch is cut from the scan with the
   same extractor as the training store (``data.nodules.extract_patch_2d`` / ``_3d``), reading only its chunks of
   the volume store (``data.volume_store``), and prepared and scored by
   the run's ``Predictor`` (its lung window, its calibration): the one preparation path. Without a run the
   probability is the blob response scaled to [0, 1] (a classical ranking, no learning).

Scans are read through the volume store (``data.nodules.load_scan``: decoded once, in a child process): the
candidate stage (HU check, LoG) holds one scan's voxels at a time, the lung mask (``imaging.segment.lung_mask``) is
computed from the stored volume slab by slab, and after it only the stored volume's memory map is kept
for the patches, the SR and the gallery, so memory does not grow with the number of scans.

Never detect with a classifier that saw the scan: the run's ``run.json`` records its data; the caller chooses the
run (the CLI warns when the scan's seriesuid is among the run's training patients).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import highdicom as hd
import numpy as np
import pandas as pd

from medlens.data.nodules import AIR_HU, Scan, extract_patch_2d, extract_patch_3d, load_scan
from medlens.data.sources import get_source
from medlens.errors import ConfigError, MedlensWarning
from medlens.evaluation.froc import FrocResult, froc_files
from medlens.imaging.nodules import check_ct_hu, nodule_candidates
from medlens.imaging.segment import lung_mask
from medlens.io.dicom_sources import dicom_sources, is_dicom_input
from medlens.report.dicom_sr import Algorithm, DetectedNodule, detection_sr, write_sr
from medlens.report.gallery import candidate_png, write_gallery
from medlens.run.predictor import Predictor
from medlens.run.run import Run
from medlens.utils import atomic_dir, atomic_path, check_new_dir

PIPELINE_CHECK = ("With a handful of scans (here LIDC-IDRI-0001 and -0002: one accepted LUNA16 nodule) the FROC is a "
                  "pipeline check, not a detection result: published detectors reach CPM 0.93-0.94 on the 888 LUNA16 "
                  "scans.")


@dataclass
class ScanDetection:
    seriesuid: str
    slices: int
    candidates: pd.DataFrame          # coordX/Y/Z, diameter_mm, score, probability (strongest first)
    seconds: float
    seconds_candidates: float
    seconds_classifier: float
    sr: Path | None = None


@dataclass
class DetectReport:
    out: Path
    scans: list[ScanDetection] = field(default_factory=list)
    threshold: float | None = None
    classifier: str = ""
    froc: FrocResult | None = None
    notes: list[str] = field(default_factory=list)


def _seriesuid(image, path: Path) -> str:
    uid = image.meta.get("series_uid")
    return str(uid) if uid else (path.stem if path.suffix.lower() == ".mhd" else path.name)


def _patches(image: Scan, world: np.ndarray, predictor) -> np.ndarray:
    """The run's inputs for each candidate: the training store's extractor, then ``Predictor.prepare``."""
    spec = predictor.spec
    size = int(predictor.meta.input_size[0])
    xs = []
    for w in world:
        p = extract_patch_2d(image, w, size) if spec.spatial_dims == 2 else extract_patch_3d(image, w, size, 1.0)
        if p is None:  # cannot happen for a candidate inside the scan; keep the row aligned all the same
            p = np.full((size,) * spec.spatial_dims, AIR_HU, np.int16)
        xs.append(predictor.prepare(p))
    return np.stack(xs) if xs else np.zeros((0, predictor.meta.in_channels) + (size,) * spec.spatial_dims, np.float32)


def trained_on(run) -> set[str]:
    """Training/validation patients of a patch-store run (the store's patient ids are seriesuids)."""
    try:
        return get_source(run.config.data.source).training_patients(run.config.data)
    except Exception:  # the store moved: nothing to compare with
        return set()


def detect_scans(scans: list[str | Path], out: str | Path, run: str | Path | None = None, *,
                 max_candidates: int = 300, gallery_size: int = 12, max_findings: int = 10, sr: bool = True,
                 annotations: str | Path | None = None, excluded: str | Path | None = None, n_boot: int = 1000,
                 seed: int = 0, progress: Callable | None = None) -> DetectReport:
    """Detect nodules in ``scans`` (``.mhd`` files or DICOM series folders) and write, into the new folder ``out``
    (it appears only when complete): ``candidates.csv`` (LUNA16: seriesuid, coordX, coordY, coordZ,
    probability), ``detections.json``, ``sr/`` (TID 1500, one planar ROI group for each of the ``max_findings``
    strongest candidates, Nodule Present or Absent at the run's validation threshold; DICOM inputs only), ``gallery/index.html``, and
    with ``annotations`` the FROC (``froc.json``, ``froc.png``)."""
    if max_candidates < 1 or gallery_size < 0 or max_findings < 0:
        raise ConfigError("max_candidates must be >= 1, gallery_size and max_findings >= 0")
    out = check_new_dir(out)  # before the candidate search, not after it
    predictor, algorithm, seen = None, None, set()
    rep = DetectReport(out)
    if run is not None:
        r = Run.open(run)
        predictor = Predictor(r)
        algorithm = Algorithm.of_run(r)
        rep.threshold = predictor.binary_threshold()
        rep.classifier = f"medlens run {r.name} ({r.meta.model}, weights {r.weights_sha256[:12]})"
        seen = trained_on(r)
    else:
        rep.classifier = "none: probability = LoG blob response scaled to [0, 1] (classical ranking)"
    rep.notes.append(PIPELINE_CHECK)
    images = []
    for i, s in enumerate(scans):
        if progress:
            progress(i, len(scans), "reading")
        t0 = time.perf_counter()
        scan = load_scan(Path(s))
        image = scan.image()  # the candidate stage filters the whole volume
        check_ct_hu(image, str(s))
        uid = _seriesuid(image, Path(s))
        if uid in seen:
            msg = (f"scan ...{uid[-12:]} was among the classifier's training scans: its detections are not a test "
                   "(choose a run that never saw it)")
            warnings.warn(msg, MedlensWarning)
            rep.notes.append(msg)
        lungs = lung_mask(scan)
        cands = nodule_candidates(image, lungs, max_candidates=max_candidates)
        del image, lungs  # from here on the scan is read patch by patch from the store
        t1 = time.perf_counter()
        world = cands[["coordX", "coordY", "coordZ"]].to_numpy(float)
        if predictor is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MedlensWarning)  # patches are the run's own kind of input
                probs = predictor.predict_arrays(_patches(scan, world, predictor)) if len(world) else np.zeros(0)
        else:
            score = cands["score"].to_numpy(float)
            top = float(np.nanmax(score)) if len(score) else 1.0
            probs = np.clip(score / (top or 1.0), 0, 1)
        cands = cands.assign(probability=np.asarray(probs, float)).sort_values("probability", ascending=False,
                                                                               kind="stable").reset_index(drop=True)
        t2 = time.perf_counter()
        rep.scans.append(ScanDetection(uid, int(scan.shape[0]), cands, t2 - t0, t1 - t0, t2 - t1))
        images.append((s, scan))
    with atomic_dir(out) as work:
        rows = pd.concat([d.candidates.assign(seriesuid=d.seriesuid) for d in rep.scans], ignore_index=True)
        with atomic_path(work / "candidates.csv") as tmp:
            rows[["seriesuid", "coordX", "coordY", "coordZ", "probability"]].to_csv(tmp, index=False)
        if sr and algorithm is not None:
            _write_srs(work, rep, images, algorithm, max_findings)
        if annotations is not None:
            rep.froc = froc_files(work / "candidates.csv", annotations, excluded, [d.seriesuid for d in rep.scans],
                                  n_boot=n_boot, seed=seed, plot=work / "froc.png",
                                  note="pipeline check (2 scans), not a detection result")
            with atomic_path(work / "froc.json") as tmp:
                Path(tmp).write_text(json.dumps(rep.froc.as_dict(), indent=2, default=float))
        if gallery_size:
            _write_gallery(work, rep, images, gallery_size, extract_patch_2d)
        summary = {"classifier": rep.classifier, "threshold": rep.threshold, "notes": rep.notes,
                   "scans": [{"seriesuid": d.seriesuid, "slices": d.slices, "candidates": len(d.candidates),
                              "at_or_above_threshold": int((d.candidates.probability >= (rep.threshold or 0.5)).sum()),
                              "seconds": round(d.seconds, 2), "seconds_candidates": round(d.seconds_candidates, 2),
                              "seconds_classifier": round(d.seconds_classifier, 2),
                              "sr": d.sr.name if d.sr else None} for d in rep.scans]}
        with atomic_path(work / "detections.json") as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=2))
    for d in rep.scans:
        if d.sr is not None:
            d.sr = out / "sr" / d.sr.name
    return rep


def _write_srs(work: Path, rep: DetectReport, images, algorithm, max_findings: int) -> None:
    """One TID 1500 SR per DICOM scan; .mhd scans have no DICOM instances to reference (noted, skipped)."""
    for d, (src, scan) in zip(rep.scans, images):
        image = scan.geometry()  # the grid and metadata: the SR references instances, not voxels
        if not is_dicom_input(src, image):
            rep.notes.append(f"scan ...{d.seriesuid[-12:]}: not a DICOM series, so no SR (it would reference no "
                             "DICOM instances)")
            continue
        sources = dicom_sources(src, image)
        found = d.candidates.head(max_findings)  # strongest first; each group says Present/Absent at the threshold
        if found.empty:
            continue
        findings = [DetectedNodule(f"nodule candidate {k + 1}", (r["coordX"], r["coordY"], r["coordZ"]),
                                   r["diameter_mm"], r["probability"], rep.threshold, hd.UID())
                    for k, r in enumerate(found.to_dict("records"))]
        (work / "sr").mkdir(exist_ok=True)
        d.sr = write_sr(detection_sr(sources, findings, algorithm, str(sources[0].FrameOfReferenceUID)),
                        work / "sr" / f"scan{len(list((work / 'sr').iterdir())) + 1}_nodules_sr.dcm")


def _write_gallery(work: Path, rep: DetectReport, images, n: int, extract) -> None:
    g = work / "gallery"
    g.mkdir()
    best = sorted(((p, k, i) for k, d in enumerate(rep.scans)
                   for i, p in enumerate(d.candidates["probability"].tolist())), reverse=True)[:n]
    figs = []
    for rank, (p, k, i) in enumerate(best, 1):
        d = rep.scans[k]
        r = d.candidates.iloc[i]
        image = images[k][1]
        w = (r.coordX, r.coordY, r.coordZ)
        patch = extract(image, w, 64)
        png = candidate_png(patch, r.diameter_mm / 2 / float(image.spacing[1]), g / f"candidate_{rank:02d}.png")
        figs.append({"rank": rank, "png": png.name, "uid_tail": d.seriesuid[-12:], "probability": f"{p:.3f}",
                     "diameter": f"{r.diameter_mm:.1f}", "where": ", ".join(f"{v:.1f}" for v in w)})
    froc = None
    if rep.froc is not None:
        f = rep.froc
        uids = [s.seriesuid for s in f.scans]
        ci = f.ci.get("cpm", (float("nan"),) * 2)
        froc = {"cpm": f"{f.cpm:.3f}", "ci": f"{ci[0]:.3f}-{ci[1]:.3f}", "n_scans": f.n_scans, "n_nodules": f.n_nodules,
                "n_ignored": f.n_ignored, "uids": [u[-12:] for u in uids], "png": str(f.plot),
                "points": [{"rate": f"{o['fp_rate']:g}", "sens": f"{o['sensitivity']:.3f}",
                            "threshold": f"{o['threshold']:.3f}", "fps": [o["fps"][u] for u in uids]}
                           for o in f.operating_points]}
    scans = [{"uid_tail": d.seriesuid[-12:], "slices": d.slices, "candidates": len(d.candidates),
              "positive": int((d.candidates.probability >= (rep.threshold or 0.5)).sum()), "seconds": d.seconds}
             for d in rep.scans]
    write_gallery(g / "index.html", title="medlens nodule detection", notes=rep.notes, scans=scans, figures=figs,
                  classifier=rep.classifier, threshold="none (0.5)" if rep.threshold is None else f"{rep.threshold:.3f}",
                  froc=froc)
