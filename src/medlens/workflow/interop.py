"""Clinical interoperability: results as DICOM SR (TID 1500) + DICOM SEG + a FHIR R5 Bundle, and the PACS
round trip (pull a study, run the model, push the results back).

Everything a call writes goes into one output folder that appears only when complete; inputs are read and
checked (series geometry, frames of reference) before any model runs or any file is written. With
``deidentify`` every exported object is built from source attributes de-identified with the project's
PS3.15 profile (``io.deid.Deidentifier``; the same ``deid_key`` gives the same UIDs as ``medlens deid``).
Nothing here logs or raises with a patient's name or ID.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom

from medlens import __version__
from medlens.data.lidc import cluster_nodules, parse_lidc_xml
from medlens.errors import ConfigError, DataError
from medlens.imaging.features import first_order, shape
from medlens.io import load
from medlens.io.deid import Deidentifier
from medlens.io.dicom import list_series, require_single_subject
from medlens.io.dicom_seg import LUNG_NODULE, build_dicom_seg, codes_from_config, save_dataset
from medlens.io.dicom_sources import dicom_sources, is_dicom_input
from medlens.io.image import Image
from medlens.io.pacs import connect
from medlens.report.dicom_sr import Algorithm, RoiFinding, classification_sr, read_tid1500, segmentation_sr, write_sr
from medlens.report.fhir import sr_to_bundle
from medlens.run import Predictor, Run
from medlens.run.operating import operating_point
from medlens.run.profile import require_in_profile
from medlens.tasks import task_of
from medlens.utils import atomic_dir, atomic_path, remove_pid_named, unique_stems
from medlens.workflow.segment import segment_files

OUTPUTS = ("sr", "seg", "fhir")


def parse_outputs(text: str | None, segmentation: bool) -> set[str]:
    """``"sr,seg,fhir"`` -> a set; ``seg`` only for segmenters; ``fhir`` is made from the SR, so it needs it."""
    if not text:
        return set()
    out = {t.strip().lower() for t in text.split(",") if t.strip()}
    bad = sorted(out - set(OUTPUTS))
    if bad:
        raise ConfigError(f"--outputs: unknown output(s) {', '.join(bad)}; choose from {', '.join(OUTPUTS)}")
    if "seg" in out and not segmentation:
        raise ConfigError("--outputs seg: a classifier has no segments (seg is for segmentation runs and nodules)")
    if "fhir" in out:
        out.add("sr")
    if segmentation and "sr" in out:
        out.add("seg")  # the SR's groups reference SEG segments
    return out


# ------------------------------------------------------------------------------------------ sources


def deidentified(sources: list, key: str | None) -> list:
    """Copies of ``sources`` with the PS3.15 basic profile applied (the originals are untouched)."""
    d = Deidentifier(key=key)
    out = []
    for ds in sources:
        c = copy.deepcopy(ds)
        d.dataset(c)
        out.append(c)
    return out


# ------------------------------------------------------------------------------------------ measurements


def roi_findings(image: Image, labels: np.ndarray, names: list[str], codes: list, prefix: str = "") -> list:
    """Volume, maximum 3D diameter and intensity mean/SD of each label 1..N of ``labels`` on ``image``'s grid
    (the same functions as ``medlens features``); empty labels are left out."""
    hu = image.modality == "CT"
    out = []
    for k, (name, c) in enumerate(zip(names, codes), start=1):
        m = labels == k
        if not m.any():
            continue
        s = shape(m, spacing=tuple(image.spacing))
        fo = first_order(image.array, m)
        out.append(RoiFinding(name, k, c, s["volume_mm3"], s["max_diameter_mm"], fo["mean"], fo["std"], hu,
                              f"{prefix}{name}", hd.UID()))
    return out


@dataclass
class Exported:
    """What one input gave: local paths of the written objects (final locations)."""

    source: str
    files: dict[str, Path] = field(default_factory=dict)
    values: dict = field(default_factory=dict)


def _write_roi_outputs(work: Path, final: Path, stem: str, image: Image, sources: list, labels: np.ndarray,
                       names: list[str], codes: list, algorithm, outputs: set[str], prefix: str = "",
                       outside: list[str] | None = None) -> Exported:
    ex = Exported(stem)
    findings = roi_findings(image, labels, names, codes, prefix)
    present = [f.segment_number for f in findings]
    if not findings:
        warnings.warn(f"{stem}: nothing segmented; no DICOM SEG or SR written", stacklevel=2)
        return ex
    # segments renumbered 1..n over the non-empty labels, so every segment of the SEG holds voxels
    relabel = np.zeros(int(labels.max()) + 1, np.uint8)
    for i, k in enumerate(present, start=1):
        relabel[k] = i
    lab = relabel[labels]
    for i, f in enumerate(findings, start=1):
        f.segment_number = i
    seg = build_dicom_seg(lab, sources, [f.label for f in findings], [f.codes for f in findings],
                          algorithm.name, tracking=[(f.tracking_id, f.tracking_uid) for f in findings])
    if "seg" in outputs:
        save_dataset(seg, work / f"{stem}_seg.dcm")
        ex.files["seg"] = final / f"{stem}_seg.dcm"
    if "sr" in outputs:
        sr = segmentation_sr(sources, seg, findings, algorithm, outside)
        write_sr(sr, work / f"{stem}_sr.dcm")
        ex.files["sr"] = final / f"{stem}_sr.dcm"
        if "fhir" in outputs:
            _write_bundle(work / f"{stem}_sr.dcm", work / f"{stem}_fhir.json")
            ex.files["fhir"] = final / f"{stem}_fhir.json"
    ex.values = {"findings": [{"label": f.label, "volume_mm3": f.volume_mm3, "max_diameter_mm": f.max_diameter_mm,
                               "mean": f.mean, "sd": f.sd} for f in findings]}
    return ex


def _write_bundle(sr_file: Path, path: Path) -> Path:
    """The FHIR Bundle of the SR as written (read back, as any reader of the file would)."""
    bundle = sr_to_bundle(read_tid1500(sr_file))
    with atomic_path(path) as tmp:
        tmp.write_text(bundle.model_dump_json(indent=2, exclude_none=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ nodules


def export_nodules(xml: str | Path, scan: str | Path, out: str | Path, outputs: set[str], *,
                   include_small: bool = False, deidentify: bool = False, deid_key: str | None = None) -> Exported:
    """LIDC reader nodules of a DICOM series as one SEG (a segment per nodule), a TID 1500 SR (a volumetric
    group per nodule, measured on the consensus mask) and a FHIR Bundle, in the new folder ``out``."""
    scan = Path(scan)
    ann = parse_lidc_xml(xml)
    image = load(scan)
    sources = dicom_sources(scan, image)
    require_single_subject(sources, scan)
    if deidentify:
        sources = deidentified(sources, deid_key)
    nodules = [p for p in cluster_nodules(ann, image, include_small=include_small)
               if p.consensus_mask is not None and p.consensus_mask.any()]
    if not nodules:
        raise DataError("no nodule with a consensus contour in these annotations", xml)
    labels = np.zeros(image.shape, np.uint8)
    for i, p in enumerate(nodules, start=1):
        labels[p.consensus_mask & (labels == 0)] = i
    digest = hashlib.sha256(Path(xml).read_bytes()).hexdigest()
    algo = Algorithm("medlens LIDC reader consensus", __version__, digest, "lidc-consensus",
                     [f"annotations SHA-256 {digest}", "consensus of >= 50% of the readers who marked the nodule"])
    names = [f"Nodule {i}" for i in range(1, len(nodules) + 1)]
    final = Path(out)
    with atomic_dir(final) as work:
        ex = _write_roi_outputs(work, final, scan.name, image, sources, labels, names, [LUNG_NODULE] * len(names),
                                algo, outputs)
    return ex


# ------------------------------------------------------------------------------------------ runs


def predict_export(run, files: Sequence[str | Path], out: str | Path, outputs: set[str], *, deidentify: bool = False,
                   deid_key: str | None = None, allow_out_of_profile: bool = False) -> tuple[list, list[Exported]]:
    """Classify files (or DICOM series folders) with a run: ``predictions.csv`` in the new folder ``out``, and
    for DICOM inputs the outputs asked for (an SR per input, a FHIR Bundle made from it).

    With outputs, an input outside the run's training profile is refused (``run.profile.OutOfProfile``, one
    line naming the file and the reasons) before anything is written, unless ``allow_out_of_profile``: then its
    SR carries the reasons as qualitative evaluations and the FHIR Bundle a note."""
    predictor = Predictor(run)
    paths = [Path(f) for f in files]
    images = [predictor.load(f) for f in paths]
    sources = []
    for f, img in zip(paths, images):  # every input checked before anything runs or is written
        if outputs and not is_dicom_input(f, img):
            raise DataError("SR/FHIR outputs need DICOM input (a DICOM file or series folder)", f)
        src = dicom_sources(f, img) if outputs else []
        if src:
            require_single_subject(src, f)
        sources.append(deidentified(src, deid_key) if deidentify and src else src)
    if outputs:  # issue 26: the gate before SR/FHIR leave medlens, before the model runs or anything is written
        for f, img in zip(paths, images):
            require_in_profile(predictor.input_warnings(img, predictor.prepare(img, str(f))), f, allow_out_of_profile)
    rows = predictor.predict_files([str(f) for f in paths])
    algo = Algorithm.of_run(run) if outputs else None
    th = predictor.thresholds()
    coding = task_of(run).coding
    op = operating_point(run)
    final = Path(out)
    done = []
    with atomic_dir(final) as work:
        table = []
        for f, stem, r, src in zip(paths, unique_stems(paths), rows, sources):
            table.append(_table_row(f, r))
            ex = Exported(str(f))
            if outputs and algo is not None:
                sr = classification_sr(src, r, run.class_names, algo, th, op, r.extra.get("input_warnings"),
                                       coding=coding)
                write_sr(sr, work / f"{stem}_sr.dcm")
                ex.files["sr"] = final / f"{stem}_sr.dcm"
                if "fhir" in outputs:
                    _write_bundle(work / f"{stem}_sr.dcm", work / f"{stem}_fhir.json")
                    ex.files["fhir"] = final / f"{stem}_fhir.json"
            done.append(ex)
        with atomic_path(work / "predictions.csv") as tmp:
            pd.DataFrame(table).to_csv(tmp, index=False)
    return rows, done


def _table_row(f, r) -> dict:
    """One ``predictions.csv`` row: the value and its prediction interval (numeric targets, issue 26), else the
    probabilities and the decision (multi-label: each label's decision at its validation threshold)."""
    if r.value is not None:
        return {"file": str(f), "prediction": r.prediction, "value": r.value, "lower": r.lower, "upper": r.upper,
                "interval_coverage": r.coverage, "unit": r.unit}
    row = {"file": str(f), "prediction": r.prediction, "probability": r.probability,
           "threshold": r.threshold, "calibrated": getattr(r, "calibrated", None) or "no",
           **{f"p_{k}": v for k, v in r.probabilities.items()}}
    for k, t in (r.label_thresholds or {}).items():
        row[f"pred_{k}"] = int(r.probabilities[k] >= t)
    return row


def segment_export(run, files: Sequence[str | Path], out: str | Path, outputs: set[str], *, tta: bool | None = None,
                   overlay: bool = True, deidentify: bool = False, deid_key: str | None = None,
                   allow_out_of_profile: bool = False) -> tuple[list[dict], list[Exported]]:
    """``segment_files`` (masks and overlays) plus, for DICOM series inputs, a SEG coded from the run's config
    (``segmentation.dicom_codes``), an SR with a volumetric group per class, and a FHIR Bundle; all in ``out``,
    which appears only when complete. An input outside the run's training profile is refused before anything
    runs or is written, unless ``allow_out_of_profile`` (then its SR carries the reasons)."""
    paths = [Path(f) for f in files]
    predictor = Predictor(run, tta=tta)
    images = [predictor.load(f) for f in paths]
    sources, outside = [], []
    for f, img in zip(paths, images):
        if not is_dicom_input(f, img) or not f.is_dir():
            raise DataError("SR/SEG/FHIR outputs need a DICOM series folder as input", f)
        src = dicom_sources(f, img)
        require_single_subject(src, f)
        sources.append(deidentified(src, deid_key) if deidentify else src)
        reasons = predictor.input_warnings(img, predictor.prepare(img, str(f)))  # issue 26: the export gate
        require_in_profile(reasons, f, allow_out_of_profile)  # allowed: segment_files warns, the SR says so
        outside.append(reasons)
    names = [str(n) for n in run.class_names[1:]]
    codes = codes_from_config(run.config.segmentation.dicom_codes, len(names))
    algo = Algorithm.of_run(run)
    final = Path(out)
    done = []
    with atomic_dir(final) as work:
        stage = work / ".masks"
        rows = segment_files(run, paths, stage, tta=tta, overlay=overlay)
        for p in sorted(stage.iterdir()):
            p.rename(work / p.name)
        stage.rmdir()
        for r in rows:
            for k in ("mask", "overlay"):
                if k in r:
                    r[k] = str(final / Path(r[k]).name)
        for f, stem, img, src, r, why in zip(paths, unique_stems(paths), images, sources, rows, outside):
            labels = np.asarray(load(work / Path(r["mask"]).name).array).astype(np.uint8)
            ex = _write_roi_outputs(work, final, stem, img, src, labels, names, codes, algo, outputs, outside=why)
            for k, v in ex.files.items():
                r[f"dicom_{k}" if k != "fhir" else "fhir"] = str(v)
            done.append(ex)
    return rows, done


def write_bundle_file(sr_path: str | Path, out: str | Path) -> Path:
    """``medlens fhir``: any TID 1500 SR -> a FHIR R5 transaction Bundle (JSON)."""
    return _write_bundle(Path(sr_path), Path(out))


# ------------------------------------------------------------------------------------------ PACS round trip


@dataclass
class RoundTrip:
    study_uid: str
    n_inputs: int
    exported: list[Exported]
    pushed: int = 0
    rows: list = field(default_factory=list)


#: modalities that are results, not images to run a model on
_NOT_IMAGES = {"SR", "SEG", "PR", "KO", "RTSTRUCT", "DOC", "REG"}
_PACS_TMP = ".medlens-pacs-"


def _require_one_subject(files, what: str) -> None:
    """The headers of ``files`` belong to one patient, study and frame of reference (``require_single_subject``)."""
    require_single_subject([pydicom.dcmread(f, stop_before_pixels=True) for f in files], what)


@contextlib.contextmanager
def _private_tempdir():
    """A temporary folder (mode 0700) for a pulled study, removed on every exit: an exception, Ctrl-C, or a
    SIGTERM (turned into SystemExit while it exists, in the main thread). A folder left by a killed process
    (``kill -9``) is removed by the next call, once its process is gone."""
    remove_pid_named(tempfile.gettempdir(), re.compile(re.escape(_PACS_TMP) + r"(\d+)-"))

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        with tempfile.TemporaryDirectory(prefix=f"{_PACS_TMP}{os.getpid()}-") as tmp:
            yield tmp
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def pacs_round_trip(run_dir, url: str, study_uid: str, out: str | Path, outputs: str | None = None, *,
                    push: bool = False, deidentify: bool = False, deid_key: str | None = None,
                    allow_http: bool = False, allow_out_of_profile: bool = False) -> RoundTrip:
    """Pull ``study_uid`` from the PACS at ``url``, run the model (a segmenter on each image series; a classifier
    on each series, or on each instance for 2D models), write the results into ``out`` and, with ``push``,
    store the SRs (and SEGs) back in the same PACS.

    The study is pulled with the checks of ``medlens pacs pull`` into a private temporary folder that is removed
    on every exit (an error, Ctrl-C, SIGTERM; one left by a killed process is removed by the next call), and
    every series must belong to one patient, study and frame of reference before any result is made of it.
    A series outside the run's training profile is refused before anything is written or pushed, unless
    ``allow_out_of_profile``."""
    run = Run.open(run_dir)
    seg = task_of(run).dense
    wanted = parse_outputs(outputs or ("sr,seg" if seg else "sr"), seg)
    if deidentify and push:
        raise ConfigError("--deidentify with --push would store de-identified results next to the identified "
                          "study; push a de-identified copy of the study first, or leave out one of the two")
    client = connect(url, allow_http=allow_http)
    client.require_study(study_uid)  # a one-line error before any model runs
    with _private_tempdir() as tmp:
        folder = client.pull(study_uid, Path(tmp) / "study")
        series = [s for s in list_series(folder) if s.modality.upper() not in _NOT_IMAGES]
        if not series:
            raise DataError(f"study {study_uid} holds no image series", client.url)
        inputs: list[Path] = []
        for s in series:
            _require_one_subject(s.files, f"series {s.series_uid}")
            d = s.files[0].parent
            if seg or run.meta.spatial_dims == 3 or len(s.files) == 1:
                inputs.append(d)
            else:
                inputs += sorted(s.files)
        if seg:
            rows, done = segment_export(run, inputs, out, wanted, deidentify=deidentify, deid_key=deid_key,
                                        allow_out_of_profile=allow_out_of_profile)
        else:
            rows, done = predict_export(run, inputs, out, wanted, deidentify=deidentify, deid_key=deid_key,
                                        allow_out_of_profile=allow_out_of_profile)
    res = RoundTrip(study_uid, len(inputs), done, rows=rows)
    if push:
        objs = [pydicom.dcmread(ex.files[k]) for ex in done for k in ("seg", "sr") if k in ex.files]
        res.pushed = client.push(objs) if objs else 0
    return res
