"""DICOM Structured Reports, TID 1500 "Measurement Report" (highdicom ``Comprehensive3DSR``).

The AI-results form IHE AIR and the HL7 SR-to-FHIR guide expect:

- classification: one TID 1501 group per finding (class): a qualitative evaluation (the finding Present or
  Absent, decided at the run's validation-chosen threshold), the probability (calibrated where the run has a
  calibration), the threshold and the validation operating point (sensitivity, specificity);
- segmentation and nodules: one TID 1411 volumetric group per segment: volume (mm3), maximum 3D diameter
  (mm), mean and standard deviation of intensity (HU for CT), a tracking identifier and UID, and a reference
  to the matching DICOM SEG segment;
- algorithm identification (TID 4019) in every group: ``medlens <model>``, the medlens version, and the
  SHA-256 of the run's weights as an algorithm parameter; the evidence: the source SOP instances.

Codes without a standard concept (decision threshold, validation sensitivity/specificity) use the private
coding scheme ``99MEDLENS``, declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion3D,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurementGroup,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from medlens import __version__
from medlens.errors import DataError
from medlens.io.dicom_seg import SegmentCodes, prepare_sources, save_dataset

LOCAL_SCHEME = "99MEDLENS"
TEMPLATE = "1500"


def _code(value: str, scheme: str, meaning: str):
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def local(value: str, meaning: str):
    return _code(value[:16], LOCAL_SCHEME, meaning)


THRESHOLD = ("threshold", "Decision threshold")
SENSITIVITY = ("val-sensitivity", "Sensitivity at threshold on validation")
SPECIFICITY = ("val-specificity", "Specificity at threshold on validation")
SPLIT_NAMES = {"val": "validation", "test": "test", "train": "training"}
# issue 26: an input outside the run's training profile, exported only when allowed, says so in every group
OUTSIDE = ("ood-input", "Input outside the training data")
# issue 26: a regression's split-conformal prediction interval, fitted on validation
INTERVAL_LOW = ("pi-lower", "Prediction interval lower limit")
INTERVAL_HIGH = ("pi-upper", "Prediction interval upper limit")
OUTSIDE_REASON = ("ood-reason", "Outside the training data because")


def operating_codes(split: str | None) -> tuple[tuple[str, str], tuple[str, str]]:
    """The sensitivity and specificity concepts of an operating point measured on ``split`` (named in the code)."""
    if not split or split == "val":
        return SENSITIVITY, SPECIFICITY
    name = SPLIT_NAMES.get(split, split)
    return ((f"{split}-sensitivity", f"Sensitivity at validation threshold on {name}"),
            (f"{split}-specificity", f"Specificity at validation threshold on {name}"))


def outside_evaluations(reasons: list[str] | None) -> list:
    """Qualitative evaluations saying the input was outside the training data: one (Yes) and one per reason
    (the reason as the coded value's meaning, at most 64 characters); empty when ``reasons`` is empty."""
    if not reasons:
        return []
    out = [QualitativeEvaluation(local(*OUTSIDE), codes.SCT.Yes)]
    for i, r in enumerate(reasons, start=1):
        kind = r.split(" ", 1)[0].lower()
        out.append(QualitativeEvaluation(local(*OUTSIDE_REASON), local(f"ood-{i}-{kind}", r)))
    return out


def class_code(name: str):
    """A class of the run as a coded finding (private scheme; the meaning is the class name)."""
    value = "".join(ch if ch.isalnum() else "-" for ch in name.strip().lower())[:16] or "class"
    return local(value, name)


def calibration_parameters(meta) -> list[str]:
    """Which calibration the probabilities carry (issue 26), as TID 4019 algorithm parameters (FHIR: Device
    properties): the scaling and where it was fitted, or that they are the model's own; nothing for a run
    that records neither (segmenters, runs written before the choice was recorded)."""
    cal, choice = getattr(meta, "calibration", None), getattr(meta, "calibration_choice", None) or {}
    gain = choice.get("improvement")
    if cal is not None:
        on = "validation" if cal.fitted_on == "val" else "a site sample"
        by = f"; held-out log-loss lower by {gain:.4f}" if isinstance(gain, (int, float)) and gain > 0 else ""
        return [f"probabilities calibrated ({cal.method}, fitted on {on}{by})"]
    if choice:
        setting = choice.get("setting")
        if setting == "auto":
            return ["probabilities not calibrated (the model's own: no scaling lowered the held-out log-loss)"]
        if setting in (None, "none"):
            return ["probabilities not calibrated (evaluation.calibration: none)"]
        # a named scaling that validation could not fit (one class, or a fit that would reverse the ranking)
        return [f"probabilities not calibrated (the model's own: evaluation.calibration {setting} gave no usable fit "
                "on validation)"]
    return []


@dataclass
class Algorithm:
    """TID 4019 algorithm identification of a run."""

    name: str
    version: str
    weights_sha256: str
    model: str
    parameters: list[str] = field(default_factory=list)

    @classmethod
    def of_run(cls, run) -> "Algorithm":
        params = [f"weights SHA-256 {run.weights_sha256}"]
        params += calibration_parameters(run.meta)
        if getattr(run.meta, "positive_class", None):  # binary: the class the probability and the finding are of
            params.append(f"positive class {run.meta.positive_class}")
        return cls(f"medlens {run.meta.model}", __version__, run.weights_sha256, run.meta.model, params)

    def template(self):
        return AlgorithmIdentification(name=self.name[:64], version=self.version[:64], parameters=self.parameters)

    @property
    def device_uid(self) -> str:
        """A UID fixed by the weights: the same model is the same observer device in every report."""
        return f"2.25.{int(hashlib.sha256(('medlens|' + self.weights_sha256).encode()).hexdigest()[:32], 16)}"


@dataclass
class RoiFinding:
    """One segment's measurements for a TID 1411 group."""

    label: str
    segment_number: int
    codes: SegmentCodes
    volume_mm3: float
    max_diameter_mm: float
    mean: float
    sd: float
    hounsfield: bool
    tracking_id: str
    tracking_uid: str


def _report(groups, algorithm: Algorithm, sources: list, seg=None, title_series: str = "medlens results",
            procedure=None):
    prepare_sources(sources)
    device = DeviceObserverIdentifyingAttributes(uid=algorithm.device_uid, name=algorithm.name[:64],
                                                 manufacturer_name="medlens", model_name=algorithm.model[:64])
    context = ObservationContext(observer_device_context=ObserverContext(observer_type=codes.cid270.Device,
                                                                         observer_identifying_attributes=device))
    report = MeasurementReport(observation_context=context, procedure_reported=procedure or codes.SCT.ImagingProcedure,
                               imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    evidence = list(sources) + ([seg] if seg is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = Comprehensive3DSR(evidence=evidence, content=report[0], series_instance_uid=hd.UID(),
                               series_number=9002, sop_instance_uid=hd.UID(), instance_number=1,
                               manufacturer="medlens", is_complete=True, series_description=title_series[:64])
    sr.SoftwareVersions = algorithm.version[:64]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "medlens local codes"
    scheme.CodingSchemeResponsibleOrganization = "medlens"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def classification_sr(sources: list, prediction, class_names: list[str], algorithm: Algorithm,
                      threshold, operating_point: dict | None = None,
                      outside: list[str] | None = None, coding: str = "one_of"):
    """A TID 1500 SR of one classifier (or regression) prediction on ``sources`` (the DICOM instances it read).

    ``coding`` is the run task's (``Task.coding``). ``one_of``: binary, one group for the positive class
    (``class_names[1]``): Present when its probability reaches ``threshold``, with the operating point of the split
    it was measured on (``operating_point["split"]``, named in the concept); multi-class, one group per class,
    Present for the predicted class. ``any_of`` (multi-label): one group per label, Present when its probability
    reaches the label's validation threshold (``threshold``: one per label, or None for 0.5). ``measurement``
    (regression, issue 26): one group whose numeric measurement is the predicted value in the target's UCUM unit,
    with the prediction interval's limits. ``outside``: the reasons the input fell outside the training data
    (exported only when allowed), as qualitative evaluations in every group."""
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"finding: {name}"[:64]),
        finding_type=class_code(name), algorithm_id=algorithm.template(), measurements=meas,
        qualitative_evaluations=[*present, *outside_evaluations(outside)] or None,
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])
        for name, meas, present in CODINGS[coding](prediction, class_names, threshold, operating_point)]
    return _report(groups, algorithm, sources, title_series=f"{algorithm.name} classification")


def _one_of(prediction, class_names: list[str], threshold, operating_point: dict | None) -> list:
    one = codes.UCUM.NoUnits
    cut = threshold if len(class_names) == 2 else None   # binary: the positive class against the threshold
    chosen = class_names[1:] if cut is not None else list(class_names)
    out = []
    for name in chosen:
        p = float(prediction.probabilities[name])
        present = (p >= cut) if cut is not None else (name == prediction.prediction)
        meas = [Measurement(name=codes.DCM.Probability, value=p, unit=one)]
        if cut is not None:
            meas.append(Measurement(name=local(*THRESHOLD), value=float(cut), unit=one))
            sens, spec = operating_codes((operating_point or {}).get("split"))
            for key, code in (("sensitivity", sens), ("specificity", spec)):
                if operating_point and operating_point.get(key) is not None:
                    meas.append(Measurement(name=local(*code), value=float(operating_point[key]), unit=one))
        out.append((name, meas, [_presence(name, present)]))
    return out


def _any_of(prediction, class_names: list[str], threshold, operating_point: dict | None) -> list:
    one = codes.UCUM.NoUnits
    cuts = np.broadcast_to(np.asarray(0.5 if threshold is None else threshold, float), (len(class_names),))
    out = []
    for name, cut in zip(class_names, cuts):
        p = float(prediction.probabilities[name])
        meas = [Measurement(name=codes.DCM.Probability, value=p, unit=one),
                Measurement(name=local(*THRESHOLD), value=float(cut), unit=one)]
        out.append((name, meas, [_presence(name, p >= cut)]))
    return out


def _measurement(prediction, class_names: list[str], threshold, operating_point: dict | None) -> list:
    unit_code = str(prediction.unit or "1")
    unit = _code(unit_code, "UCUM", unit_code)
    name = class_names[0]
    meas = [Measurement(name=class_code(name), value=float(prediction.value), unit=unit)]
    if prediction.lower is not None and prediction.upper is not None:
        pct = f"{100 * float(prediction.coverage):g}%"
        meas += [Measurement(name=local(*INTERVAL_LOW), value=float(prediction.lower), unit=unit),
                 Measurement(name=local(*INTERVAL_HIGH), value=float(prediction.upper), unit=unit),
                 Measurement(name=local("pi-coverage", f"Prediction interval coverage ({pct})"),
                             value=float(prediction.coverage), unit=codes.UCUM.NoUnits)]
    return [(name, meas, [])]


def _presence(name: str, present) -> QualitativeEvaluation:
    return QualitativeEvaluation(class_code(name), codes.SCT.Present if present else codes.SCT.Absent)


# how each task coding (``Task.coding``) becomes measurement groups: (name, measurements, evaluations) per group
CODINGS = {"one_of": _one_of, "any_of": _any_of, "measurement": _measurement}


def segmentation_sr(sources: list, seg, findings: list[RoiFinding], algorithm: Algorithm,
                    outside: list[str] | None = None):
    """A TID 1500 SR with one TID 1411 volumetric group per segment of ``seg`` (the written DICOM SEG);
    ``outside``: why the input was outside the training data, as qualitative evaluations in every group."""
    groups = []
    for f in findings:
        category, typ, region = f.codes.coded()
        unit = codes.UCUM.HounsfieldUnit if f.hounsfield else codes.UCUM.NoUnits
        meas = [Measurement(name=codes.SCT.Volume, value=float(f.volume_mm3), unit=codes.UCUM.CubicMillimeter),
                Measurement(name=codes.SCT.Diameter, value=float(f.max_diameter_mm), unit=codes.UCUM.Millimeter,
                            derivation=codes.SCT.Maximum),
                Measurement(name=codes.SCT.Mean, value=float(f.mean), unit=unit),
                Measurement(name=codes.SCT.StandardDeviation, value=float(f.sd), unit=unit)]
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=f.tracking_uid, identifier=f.tracking_id[:64]),
            referenced_segment=ReferencedSegment(seg.SOPClassUID, seg.SOPInstanceUID, f.segment_number,
                                                 source_series=SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            finding_type=typ, finding_category=category, algorithm_id=algorithm.template(),
            finding_sites=[FindingSite(region)] if region is not None else None, measurements=meas,
            qualitative_evaluations=outside_evaluations(outside) or None))
    return _report(groups, algorithm, sources, seg, title_series=f"{algorithm.name} measurements")


def write_sr(sr, path: str | Path) -> Path:
    return save_dataset(sr, path)


def read_tid1500(path: str | Path):
    """Read a DICOM SR and check that it is a TID 1500 measurement report; a one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, Exception) as e:  # truncated or foreign files raise many types
        raise DataError(f"not a readable DICOM file ({type(e).__name__})", path) from None
    if str(ds.get("Modality", "")) != "SR" or "ContentSequence" not in ds:
        raise DataError(f"not a DICOM structured report (modality {ds.get('Modality', 'none')})", path)
    templates = [str(t.get("TemplateIdentifier", "")) for t in ds.get("ContentTemplateSequence", [])]
    title = ds.get("ConceptNameCodeSequence", [None])[0]
    is_1500 = TEMPLATE in templates or (title is not None and (title.get("CodeValue"), title.get(
        "CodingSchemeDesignator")) == ("126000", "DCM"))
    if not is_1500:
        sop = getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))
        raise DataError(f"not a TID 1500 measurement report ({sop}, template {', '.join(templates) or 'none'})", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sr = hd.sr.srread(path)
            _ = sr.content
    except Exception as e:  # highdicom refuses malformed content trees with several exception types
        raise DataError(f"malformed TID 1500 content ({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                        path) from None
    return sr


@dataclass
class DetectedNodule:
    """One detection for a TID 1410 planar ROI group: its centre (world LPS mm), the diameter estimated by the
    candidate detector, the classifier's probability and the run's validation threshold."""

    label: str
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    probability: float
    threshold: float | None
    tracking_uid: str


def detection_sr(sources: list, findings: list[DetectedNodule], algorithm: Algorithm, frame_of_reference_uid: str):
    """A TID 1500 SR with one TID 1410 planar ROI group per detected nodule: the axial circle of its estimated
    diameter around its centre (SCOORD3D polygon in the scan's frame of reference), the diameter, the probability
    and the decision threshold, and the finding Nodule Present."""
    one = codes.UCUM.NoUnits
    angles = np.linspace(0, 2 * np.pi, 25)
    groups = []
    for f in findings:
        r = max(float(f.diameter_mm) / 2, 0.5)
        x, y, z = (float(v) for v in f.centre_mm)
        ring = np.column_stack([x + r * np.cos(angles), y + r * np.sin(angles), np.full(len(angles), z)])
        ring[-1] = ring[0]  # a closed polygon
        meas = [Measurement(name=codes.SCT.Diameter, value=float(f.diameter_mm), unit=codes.UCUM.Millimeter),
                Measurement(name=codes.DCM.Probability, value=float(f.probability), unit=one)]
        if f.threshold is not None:
            meas.append(Measurement(name=local(*THRESHOLD), value=float(f.threshold), unit=one))
        present = f.threshold is None or f.probability >= f.threshold
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=f.tracking_uid, identifier=f.label[:64]),
            referenced_region=ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                                            graphic_data=ring,
                                            frame_of_reference_uid=frame_of_reference_uid),
            finding_type=codes.SCT.Nodule, algorithm_id=algorithm.template(), measurements=meas,
            qualitative_evaluations=[QualitativeEvaluation(codes.SCT.Nodule,
                                                           codes.SCT.Present if present else codes.SCT.Absent)]))
    return _report(groups, algorithm, sources, title_series=f"{algorithm.name} nodule detection")
