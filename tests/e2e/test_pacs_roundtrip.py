"""The PACS round trip against a real Orthanc (Debian's orthanc + orthanc-dicomweb), run as a user would:
push the LIDC-IDRI-0001 series, `medlens predict RUN --from-pacs URL --study UID --push`, then query the new
SR (and SEG, for a segmenter) back from Orthanc and check them with highdicom against the local outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from interop_checks import dciodvfy
from orthanc import orthanc  # noqa: F401  (session fixture: a real Orthanc, stopped by PID at the end)
from test_cli import _one_line_error, medlens

REPO = Path(__file__).resolve().parents[2]


def _study_uid(folder: Path) -> str:
    f = next(p for p in sorted(folder.rglob("*.dcm")))
    return str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def lidc_in_pacs(orthanc, data_root):  # noqa: F811
    series = data_root / "lidc-idri-0001"
    r = medlens("pacs", "push", orthanc.dicomweb, series, check=True)
    assert "stored 133 instance(s)" in " ".join(r.stdout.split())  # the console may wrap the line
    return _study_uid(series)


def _new_instances(url: str, study: str, modality: str) -> list[dict]:
    from medlens.io.pacs import connect

    return [i for i in connect(url).instances(study) if i.get("Modality") == modality]


def test_query_pull_and_bad_requests(orthanc, lidc_in_pacs, tmp_path):  # noqa: F811
    r = medlens("pacs", "query", orthanc.dicomweb, check=True)
    assert lidc_in_pacs in r.stdout and "LIDC-IDRI-0001" not in r.stdout  # UIDs, never the patient
    r = medlens("pacs", "query", orthanc.dimse, "--study", lidc_in_pacs, check=True)  # the DIMSE fallback
    assert "133" in r.stdout and "CT" in r.stdout
    medlens("pacs", "pull", orthanc.dimse, "--study", lidc_in_pacs, "--out", tmp_path / "cget", check=True)
    assert len(list((tmp_path / "cget").rglob("*.dcm"))) == 133
    missing = "1.2.826.0.1.3680043.8.498.1"
    _one_line_error(medlens("pacs", "pull", orthanc.dicomweb, "--study", missing, "--out", tmp_path / "m"),
                    f"has no study {missing}")
    _one_line_error(medlens("pacs", "query", "http://127.0.0.1:9/dicom-web"), "unreachable")
    _one_line_error(medlens("pacs", "query", "dimse://ANY@127.0.0.1:9"), "unreachable")
    assert not (tmp_path / "m").exists()


def test_classifier_round_trip(orthanc, lidc_in_pacs, trained_run, tmp_path):  # noqa: F811
    """A 2D classifier on each slice of the study: one SR per instance, stored back and read back."""
    import highdicom as hd

    missing = "1.2.826.0.1.3680043.8.498.2"
    _one_line_error(medlens("predict", trained_run, "--from-pacs", orthanc.dicomweb, "--study", missing, "--push",
                            "--out", tmp_path / "x"), f"has no study {missing}")
    assert not (tmp_path / "x").exists()
    srs = len(_new_instances(orthanc.dicomweb, lidc_in_pacs, "SR"))
    # issue 26: CT slices are outside the X-ray model's training data: --push refuses them, nothing is stored
    _one_line_error(medlens("predict", trained_run, "--from-pacs", orthanc.dicomweb, "--study", lidc_in_pacs,
                            "--push", "--out", tmp_path / "refused"),
                    "outside the training data", "modality CT (CT) but the model was trained on DX")
    assert not (tmp_path / "refused").exists() and len(_new_instances(orthanc.dicomweb, lidc_in_pacs, "SR")) == srs
    r = medlens("predict", trained_run, "--from-pacs", orthanc.dicomweb, "--study", lidc_in_pacs, "--push",
                "--out", tmp_path / "o", "--allow-out-of-profile", check=True)
    assert "stored 133 instance(s)" in " ".join(r.stdout.split())  # the console may wrap the line
    local = {pydicom.dcmread(p).SOPInstanceUID: p for p in (tmp_path / "o").glob("*_sr.dcm")}
    assert len(local) == 133
    remote = _new_instances(orthanc.dicomweb, lidc_in_pacs, "SR")
    assert {i["SOPInstanceUID"] for i in remote} == set(local)
    from medlens.io.pacs import connect

    pick = remote[0]
    ds = connect(orthanc.dicomweb).retrieve_instance(lidc_in_pacs, pick["SeriesInstanceUID"], pick["SOPInstanceUID"])
    path = tmp_path / "back_sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = hd.sr.srread(path).content.get_image_measurement_groups()[0]
        mine = hd.sr.srread(local[pick["SOPInstanceUID"]]).content.get_image_measurement_groups()[0]
    assert [(m.name.meaning, m.value) for m in back.get_measurements()] == \
        [(m.name.meaning, m.value) for m in mine.get_measurements()]
    assert back.get_qualitative_evaluations()[0].value == mine.get_qualitative_evaluations()[0].value


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, data_root):
    """A tiny 3D U-Net (mri-seg config, one short epoch) with SNOMED codes for its class in the config."""
    import torch

    from medlens.config import config_from_dict, load_config
    from medlens.workflow.train import train

    torch.set_num_threads(1)
    d = load_config(REPO / "configs" / "mriseg_unet3d.yaml").model_dump()
    d.update(output_dir=str(tmp_path_factory.mktemp("segrun")), name="tiny3d")
    d["model"]["params"] = {"channels": [4, 8, 16], "norm": "instance"}
    d["train"]["epochs"] = 1
    d["segmentation"].update(patches_per_epoch=8, largest_components=1, dicom_codes=[
        {"category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"},
         "type": {"value": "52988006", "meaning": "Lesion"}, "region": {"value": "12738006", "meaning": "Brain"}}])
    d["evaluation"]["bootstrap"] = 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(config_from_dict(d), progress_bar=False)


def test_segmenter_round_trip(orthanc, seg_run, tmp_path, data_root):  # noqa: F811
    """A 3D segmenter on a real MR volume stored as a DICOM study: SR + SEG pushed back, read back equal."""
    import highdicom as hd

    from medlens.io import load
    from medlens.io.dicom_seg import source_slices
    from medlens.io.writers import write_dicom_series

    series = tmp_path / "brain1"
    write_dicom_series(load(data_root / "mri-seg" / "brain1_image.nrrd"), series, modality="MR")
    medlens("pacs", "push", orthanc.dicomweb, series, check=True)
    study = _study_uid(series)
    r = medlens("predict", seg_run, "--from-pacs", orthanc.dicomweb, "--study", study, "--push", "--out",
                tmp_path / "o", check=True)
    assert "stored 2 instance(s)" in " ".join(r.stdout.split())  # the console may wrap the line
    out = tmp_path / "o"
    (mask_path,) = out.glob("*_mask.nii.gz")
    (sr_path,) = out.glob("*_sr.dcm")
    (seg_path,) = out.glob("*_seg.dcm")
    from medlens.io.pacs import connect

    client = connect(orthanc.dicomweb)
    got = {}
    for modality, local in (("SR", sr_path), ("SEG", seg_path)):
        (inst,) = _new_instances(orthanc.dicomweb, study, modality)
        assert inst["SOPInstanceUID"] == pydicom.dcmread(local, stop_before_pixels=True).SOPInstanceUID
        ds = client.retrieve_instance(study, inst["SeriesInstanceUID"], inst["SOPInstanceUID"])
        got[modality] = tmp_path / f"back_{modality}.dcm"
        ds.save_as(got[modality], enforce_file_format=True)
        dciodvfy(got[modality])
    vol = load(series)
    uids = [d.SOPInstanceUID for d in source_slices(series, vol)]
    back = hd.seg.segread(got["SEG"]).get_pixels_by_source_instance(uids, combine_segments=True,
                                                                    skip_overlap_checks=True)
    mask = load(mask_path).array
    assert mask.any()
    np.testing.assert_array_equal(back, mask)
    seg_ds = pydicom.dcmread(got["SEG"], stop_before_pixels=True)
    assert seg_ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (group,) = hd.sr.srread(got["SR"]).content.get_volumetric_roi_measurement_groups()
    vals = {m.name.meaning: m.value for m in group.get_measurements()}
    assert vals["Volume"] == pytest.approx(float(mask.sum() * np.prod(vol.spacing)), rel=1e-5)
    assert group.referenced_segment.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
    assert group.finding_type.meaning == "Lesion"


def test_a_mr_segmenter_refuses_a_ct_series_and_nothing_is_stored(orthanc, lidc_in_pacs, seg_run, tmp_path,  # noqa: F811
                                                                  data_root):
    """Issue 26: the brain-MR lesion model on the chest CT study. `predict --from-pacs --push` is refused in one
    line before anything is written or stored (Orthanc holds no new SEG or SR), and so is `segment` with
    DICOM outputs on the local series. The run's profile knows MR from the config (NRRD files do not say it)."""
    from medlens.run import Run

    assert Run.open(seg_run).meta.input_profile.modality == "MR"
    before = {m: len(_new_instances(orthanc.dicomweb, lidc_in_pacs, m)) for m in ("SEG", "SR")}
    _one_line_error(medlens("predict", seg_run, "--from-pacs", orthanc.dicomweb, "--study", lidc_in_pacs, "--push",
                            "--out", tmp_path / "o"),
                    "outside the training data", "modality CT (CT) but the model was trained on MR (MR) images")
    assert not (tmp_path / "o").exists()
    assert {m: len(_new_instances(orthanc.dicomweb, lidc_in_pacs, m)) for m in ("SEG", "SR")} == before
    series = next((data_root / "lidc-idri-0001").rglob("*.dcm")).parent
    _one_line_error(medlens("segment", seg_run, series, "--out", tmp_path / "s", "--outputs", "sr,seg,fhir"),
                    series.name, "outside the training data", "trained on MR")
    _one_line_error(medlens("segment", seg_run, series, "--out", tmp_path / "d", "--dicom-seg"),
                    "outside the training data")
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()
