"""LUNA16 / LIDC nodule pipeline on the real scan: patches, LIDC XML, the store, training from disk."""

import warnings
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pandas as pd
import pydicom
import pytest
from matplotlib.path import Path as Polygon

from medlens.data.lidc import cluster_nodules, parse_lidc_xml
from medlens.data.nodules import PatchStoreDataset, extract_patch_2d, extract_patch_3d, read_candidates
from medlens.errors import DataError
from medlens.io import load
from medlens.workflow.nodules import extract_patches


@pytest.fixture(scope="module")
def scans(data_root):
    luna = load(next((data_root / "luna16").glob("*.mhd")))
    dicom = load(data_root / "lidc-idri-0001")
    return {"mhd": luna, "dicom": dicom}


@pytest.fixture(scope="module")
def nodule(data_root):
    return read_candidates(data_root / "luna16" / "annotations.csv").iloc[0]


def _contrast(patch: np.ndarray, spacing, radius_mm: float) -> tuple[float, float]:
    grid = np.indices(patch.shape).astype(float)
    c = (np.array(patch.shape) - 1) / 2.0
    d = np.sqrt(sum(((g - cc) * s) ** 2 for g, cc, s in zip(grid, c, spacing)))
    return float(patch[d <= 0.6 * radius_mm].mean()), float(patch[(d > 1.5 * radius_mm) & (d <= 2.5 * radius_mm)].mean())


@pytest.mark.parametrize("reader", ["mhd", "dicom"])
def test_patch_is_centred_on_the_nodule(scans, nodule, reader):
    img = scans[reader]
    world = (nodule.coordX, nodule.coordY, nodule.coordZ)
    r = nodule.diameter_mm / 2
    p2 = extract_patch_2d(img, world, 64)
    inside, around = _contrast(p2.astype(float), img.spacing[1:], r)
    assert 60 < inside < 130 and -700 < around < -450, (inside, around)  # about +90 HU vs about -590 HU
    p3 = extract_patch_3d(img, world, 48, 1.0)
    inside3, around3 = _contrast(p3.astype(float), (1.0, 1.0, 1.0), r)
    assert inside3 > 40 and around3 < -400 and inside3 - around3 > 450, (inside3, around3)


def test_lidc_xml_nodule_agrees_with_luna16(data_root, scans, nodule):
    xml = next((data_root / "lidc-idri-0001").rglob("*.xml"))
    ann = parse_lidc_xml(xml)
    assert len(ann.readers) == 4 and ann.series_uid == nodule.seriesuid
    big = cluster_nodules(ann, scans["dicom"])[0]
    assert big.n_readers == 4 and big.malignancy is not None
    assert np.linalg.norm(big.centroid_world - [nodule.coordX, nodule.coordY, nodule.coordZ]) < 5.0
    assert abs(big.diameter_mm - nodule.diameter_mm) / nodule.diameter_mm < 0.20
    assert big.consensus_mask.sum() * np.prod(scans["dicom"].spacing) == pytest.approx(big.consensus_volume_mm3)
    small = [p for p in cluster_nodules(ann, scans["dicom"], include_small=True) if p.diameter_mm < 3]
    assert len(small) >= 1 and len(ann.non_nodules) > 0


def _series_geometry(series):
    """Straight from the DICOM headers: slice z by SOP UID, the sorted slice positions, the in-plane
    origin and spacing, and the image size."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.rglob("*.dcm")]
    z_of = {str(h.SOPInstanceUID): float(h.ImagePositionPatient[2]) for h in headers}
    dy, dx = map(float, headers[0].PixelSpacing)
    origin = tuple(map(float, headers[0].ImagePositionPatient[:2]))
    return z_of, np.unique(list(z_of.values())), (dy, dx), origin, (int(headers[0].Rows), int(headers[0].Columns))


def _reader_contours(xml, near_xy, max_px: float = 25.0):
    """Each reader's contours (SOP UID, inclusion, (x, y) points) of the nodule whose contours centre near
    ``near_xy`` (pixels), read with ElementTree."""
    ns = "{http://www.nih.gov}"
    readers = []
    for session in ET.parse(xml).getroot().iter(f"{ns}readingSession"):
        for n in session.iter(f"{ns}unblindedReadNodule"):
            rois = [(r.findtext(f"{ns}imageSOP_UID").strip(), r.findtext(f"{ns}inclusion").strip() == "TRUE",
                     np.array([(float(e.findtext(f"{ns}xCoord")), float(e.findtext(f"{ns}yCoord")))
                               for e in r.iter(f"{ns}edgeMap")])) for r in n.iter(f"{ns}roi")]
            pts = np.concatenate([p for _, _, p in rois])
            if len(pts) > len(rois) and np.linalg.norm(pts.mean(0) - near_xy) < max_px:  # contours, not a point
                readers.append(rois)
    return readers


def _filled(points: np.ndarray, shape) -> np.ndarray:
    """Pixels whose centre lies inside the contour, plus the contour pixels themselves."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = Polygon(points).contains_points(np.column_stack([xx.ravel(), yy.ravel()])).reshape(shape)
    inside[points[:, 1].astype(int), points[:, 0].astype(int)] = True
    return inside


def test_consensus_volume_matches_an_independent_count(data_root, scans, nodule):
    """The 4-reader nodule's 50 % consensus volume, counted here from the XML contours and the DICOM
    headers alone (ElementTree, pydicom, matplotlib's point-in-polygon), against the library's."""
    from medlens.data.lidc import consensus_mask_image

    series = data_root / "lidc-idri-0001"
    z_of, zs, (dy, dx), (ox, oy), shape = _series_geometry(series)
    dz = float(np.median(np.diff(zs)))
    centre = ((nodule.coordX - ox) / dx, (nodule.coordY - oy) / dy)  # LUNA16 world mm -> pixel (x, y)
    readers = _reader_contours(next(series.rglob("*.xml")), centre)
    assert len(readers) == 4
    votes: dict[int, np.ndarray] = {}
    for rois in readers:
        marked: dict[int, np.ndarray] = {}
        for uid, inclusion, points in sorted(rois, key=lambda r: not r[1]):  # inclusions, then exclusions
            k = int(np.searchsorted(zs, z_of[uid]))
            m = marked.get(k, np.zeros(shape, bool))
            marked[k] = m | _filled(points, shape) if inclusion else m & ~_filled(points, shape)
        for k, m in marked.items():
            votes[k] = votes.get(k, 0) + m
    expected_voxels = sum(int((v >= 2).sum()) for v in votes.values())  # at least 2 of the 4 readers
    expected_mm3 = expected_voxels * dx * dy * dz
    assert 5000 < expected_mm3 < 10000  # a 23 mm nodule (a 23.35 mm sphere is 6,666 mm3)
    ann = parse_lidc_xml(next(series.rglob("*.xml")))
    big = cluster_nodules(ann, scans["dicom"])[0]
    assert big.consensus_volume_mm3 == pytest.approx(expected_mm3, rel=0.01)
    mask = consensus_mask_image(ann, scans["dicom"]).array
    assert mask.sum() * np.prod(scans["dicom"].spacing) == pytest.approx(expected_mm3, rel=0.01)


def test_xml_that_is_not_lidc(tmp_path):
    (tmp_path / "a.xml").write_text("<?xml version='1.0'?><Report><x/></Report>")
    with pytest.raises(DataError, match="not an LIDC read message"):
        parse_lidc_xml(tmp_path / "a.xml")
    (tmp_path / "b.xml").write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(DataError, match="not well-formed XML"):
        parse_lidc_xml(tmp_path / "b.xml")


def test_bad_annotation_csvs(data_root, tmp_path):
    (tmp_path / "bad.csv").write_text("series,x,y\n1,2,3\n")
    with pytest.raises(DataError, match="lacks the column"):
        read_candidates(tmp_path / "bad.csv")
    rows = pd.read_csv(data_root / "luna16" / "annotations.csv")
    extra = pd.DataFrame([{"seriesuid": "1.2.3.no.such.scan", "coordX": 0, "coordY": 0, "coordZ": 0, "diameter_mm": 5},
                          {"seriesuid": rows.seriesuid[0], "coordX": 5000, "coordY": 0, "coordZ": 0, "diameter_mm": 5}])
    pd.concat([rows, extra]).to_csv(tmp_path / "ann.csv", index=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = extract_patches(data_root / "luna16", tmp_path / "ann.csv", tmp_path / "s.h5", neg_ratio=2)
    msgs = " ".join(str(x.message) for x in w)
    assert rep.skipped_no_scan == 1 and rep.skipped_outside == 1 and rep.positives == 1
    assert "1 annotation(s) name a seriesuid with no scan" in msgs and "1 coordinate(s) outside" in msgs
    only_missing = tmp_path / "none.csv"
    extra.iloc[:1].to_csv(only_missing, index=False)
    with pytest.raises(DataError, match="no annotation matches a scan"):
        extract_patches(data_root / "luna16", only_missing, tmp_path / "t.h5")


@pytest.fixture(scope="module")
def store(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "luna2d.h5"
    rep = extract_patches(data_root / "luna16", data_root / "luna16" / "annotations.csv", out, neg_ratio=5, seed=0)
    return out, rep


def test_store_contents_and_streaming(store):
    out, rep = store
    assert rep.positives == 1 and rep.augmented == 4 and rep.negatives == 5
    with h5py.File(out) as f:
        assert f["patches"].shape == (10, 1, 50, 50) and f["patches"].chunks == (1, 1, 50, 50)
        assert f["patches"].dtype == np.int16 and set(f["labels"][()]) == {0, 1}
        assert f["world_mm"].shape == (10, 3) and f["seriesuid"].asstr()[0].startswith("1.3.6.1.4.1.14519")
        hu = f["patches"][0, 0]
    ds = PatchStoreDataset(out)
    x, y = ds.batch([3, 0, 7])
    assert x.shape == (3, 1, 50, 50) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert np.allclose(x[1, 0].numpy(), np.clip((hu + 1350) / 1500, 0, 1), atol=1e-6)  # lung window, same order


def test_seed_config_trains_from_the_store(store, tmp_path):
    from medlens.config import load_config
    from medlens.workflow.train import train
    from pathlib import Path

    out, _ = store
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "luna16_seed_cnn.yaml",
                      [f"data.path={out}", f"output_dir={tmp_path}", "train.epochs=2", "evaluation.bootstrap=20",
                       "data.test_patient=null",  # this store holds LIDC-IDRI-0001 only
                       "data.val_fraction=0.3", "data.test_fraction=0.3"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(cfg, progress_bar=False)
    html = (run / "report.html").read_text()
    assert "patch-level split" in html and "specificity" in html
    m = __import__("json").loads((run / "metrics.json").read_text())["test"]
    assert {"sensitivity", "specificity", "ppv", "auc"} <= set(m["metrics"]) and len(m["confusion_matrix"]) == 2
