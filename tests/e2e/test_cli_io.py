"""medlens info / convert / view / deid / predict (DICOM) from the command line, on real data."""

import shutil

import numpy as np
import pydicom

from test_cli import _one_line_error, medlens


def test_info_shows_geometry_and_no_identifiers(data_root):
    r = medlens("info", data_root / "lidc-idri-0001", check=True)
    assert "(133, 512, 512)" in r.stdout and "2.5, 0.703125, 0.703125" in r.stdout and "LPS" in r.stdout
    ds = pydicom.dcmread(next((data_root / "lidc-idri-0001").rglob("*.dcm")), stop_before_pixels=True)
    for secret in (str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)):
        assert secret not in r.stdout
    r = medlens("info", data_root / "lidc-idri-0001", "--show-phi", check=True)
    assert str(ds.SeriesInstanceUID) in r.stdout.replace("\n", "").replace("│", "").replace(" ", "")


def test_convert_and_view(data_root, tmp_path):
    medlens("convert", data_root / "lidc-idri-0001", tmp_path / "ct.nii.gz", check=True)
    from medlens.io import load

    nii = load(tmp_path / "ct.nii.gz")
    mhd = load(next((data_root / "luna16").glob("*.mhd")))
    assert np.array_equal(nii.array, mhd.array) and np.allclose(nii.origin, mhd.origin, atol=1e-3)
    medlens("view", tmp_path / "ct.nii.gz", tmp_path / "views", "--point", "56.2,86.3,-115.9", check=True)
    assert len(list((tmp_path / "views").glob("*.png"))) == 4


def test_series_gap_error_and_allow_gaps(data_root, tmp_path):
    files = sorted((data_root / "lidc-idri-0001").rglob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    for f in files[:20] + files[21:40]:
        shutil.copy(f, tmp_path / f.name)
    _one_line_error(medlens("info", tmp_path), "1 missing slice(s)", files[19].name, files[21].name)
    r = medlens("info", tmp_path, "--allow-gaps", check=True)
    assert "(39, 512, 512)" in r.stdout


def test_deid_cli(data_root, tmp_path):
    r = medlens("deid", data_root / "lidc-idri-0001", tmp_path / "anon", "--date-shift", "-30", check=True)
    assert "133 files" in r.stdout and "BurnedInAnnotation" in r.stdout
    assert (tmp_path / "anon" / "deid_log.csv").exists()


def test_bad_inputs_from_cli(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    _one_line_error(medlens("info", tmp_path / "empty.dcm"), "empty.dcm", "0 bytes")
    (tmp_path / "fake.dcm").write_text("hello\n" * 50)
    _one_line_error(medlens("info", tmp_path / "fake.dcm"), "fake.dcm", "not a DICOM file")


def test_predict_accepts_dicom_radiographs(trained_run):
    import data_store
    from pathlib import Path

    cr = Path(data_store.__file__).parent / "data" / "RG3_UNCI.dcm"  # a real computed radiograph
    r = medlens("predict", trained_run, cr, check=True)
    assert "RG3_UNCI.dcm" in r.stdout and ("normal" in r.stdout or "pneumonia" in r.stdout)


def test_process_and_features_cli(data_root, tmp_path):
    r = medlens("process", data_root / "mri-seg" / "breast1_image.nrrd", tmp_path / "p.nii.gz", "--steps",
                "denoise:median,stretch", check=True)
    assert (tmp_path / "p.nii.gz").exists() and "denoise:median -> stretch" in r.stdout
    _one_line_error(medlens("process", data_root / "mri-seg" / "breast1_image.nrrd", tmp_path / "q.nii.gz", "--steps",
                            "blur"), "unknown step 'blur'")
    r = medlens("features", data_root / "mri-seg" / "breast1_image.nrrd", data_root / "mri-seg" / "breast1_label.nrrd",
                check=True)
    assert "volume_mm3" in r.stdout and "glcm_contrast" in r.stdout
    _one_line_error(medlens("features", data_root / "mri-seg" / "brain1_image.nrrd",
                            data_root / "mri-seg" / "breast1_label.nrrd"), "breast1_label.nrrd", "differs from the image grid")
