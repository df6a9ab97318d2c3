"""LIDC-IDRI reader annotations (XML): reader sessions, nodule contours, characteristics,
per-reader and consensus masks, and clustering of reader marks into physical nodules.

Coordinates: contour points are (x = column, y = row) pixel indices of the slice at
``imageZposition``; masks are built on the grid of the scan's ``Image`` ((z, y, x)).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from medlens.errors import DataError
from medlens.io.image import Image

CHARACTERISTICS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin", "lobulation",
                   "spiculation", "texture", "malignancy")


@dataclass
class Roi:
    z: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray  # (N, 2) of (x, y)


@dataclass
class ReaderNodule:
    reader: str
    nodule_id: str
    rois: list[Roi]
    characteristics: dict[str, int] = field(default_factory=dict)

    @property
    def is_small(self) -> bool:
        """A < 3 mm nodule: marked by its centre only (one point, no characteristics)."""
        return not self.characteristics and all(len(r.points) <= 1 for r in self.rois)


@dataclass
class NonNodule:
    reader: str
    non_nodule_id: str
    z: float
    sop_uid: str
    point: tuple[float, float]


@dataclass
class LidcAnnotation:
    series_uid: str
    study_uid: str
    readers: list[str]
    nodules: list[ReaderNodule]
    non_nodules: list[NonNodule]
    source: str = ""


def _text(el, tag, ns) -> str:
    t = el.find(f"{ns}{tag}")
    return (t.text or "").strip() if t is not None else ""


def parse_lidc_xml(path: str | Path) -> LidcAnnotation:
    """Parse an LIDC-IDRI ``LidcReadMessage`` XML file."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"not well-formed XML ({e})", path) from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag.removeprefix(ns) != "LidcReadMessage":
        raise DataError(f"not an LIDC read message (root element <{root.tag.removeprefix(ns)}>, "
                        "expected <LidcReadMessage>)", path)
    header = root.find(f"{ns}ResponseHeader")
    series = _text(header, "SeriesInstanceUid", ns) if header is not None else ""
    study = _text(header, "StudyInstanceUID", ns) if header is not None else ""
    readers, nodules, non_nodules = [], [], []
    for si, session in enumerate(root.iter(f"{ns}readingSession")):
        reader = _text(session, "servicingRadiologistID", ns) or f"reader{si}"
        readers.append(reader)
        for n in session.findall(f"{ns}unblindedReadNodule"):
            chars = {}
            c = n.find(f"{ns}characteristics")
            if c is not None:
                for k in CHARACTERISTICS:
                    v = _text(c, k, ns)
                    if v.isdigit():
                        chars[k] = int(v)
            rois = []
            for r in n.findall(f"{ns}roi"):
                try:
                    z = float(_text(r, "imageZposition", ns))
                except ValueError:
                    raise DataError(f"nodule '{_text(n, 'noduleID', ns)}' has a ROI without imageZposition", path)
                pts = [(float(_text(e, "xCoord", ns)), float(_text(e, "yCoord", ns))) for e in r.findall(f"{ns}edgeMap")]
                rois.append(Roi(z, _text(r, "imageSOP_UID", ns), _text(r, "inclusion", ns).upper() != "FALSE",
                                np.array(pts, float).reshape(-1, 2)))
            nodules.append(ReaderNodule(reader, _text(n, "noduleID", ns), rois, chars))
        for nn in session.findall(f"{ns}nonNodule"):
            loc = nn.find(f"{ns}locus")
            pt = (float(_text(loc, "xCoord", ns)), float(_text(loc, "yCoord", ns))) if loc is not None else (0.0, 0.0)
            non_nodules.append(NonNodule(reader, _text(nn, "nonNoduleID", ns), float(_text(nn, "imageZposition", ns)),
                                         _text(nn, "imageSOP_UID", ns), pt))
    if not readers:
        raise DataError("LIDC read message without reading sessions", path)
    return LidcAnnotation(series, study, readers, nodules, non_nodules, source=path.name)


def _slice_index(image: Image, z: float) -> int | None:
    zs = image.voxel_to_world(np.stack([np.arange(image.shape[0]), np.zeros(image.shape[0]),
                                        np.zeros(image.shape[0])], 1))[:, 2]
    k = int(np.argmin(np.abs(zs - z)))
    return k if abs(zs[k] - z) <= 0.51 * image.spacing[0] else None


def reader_mask(nodule: ReaderNodule, image: Image) -> np.ndarray:
    """3D boolean mask of one reader's nodule on the scan's grid (contour pixels included)."""
    mask = np.zeros(image.shape, bool)
    for roi in sorted(nodule.rois, key=lambda r: not r.inclusion):  # inclusions first, then exclusions
        k = _slice_index(image, roi.z)
        if k is None or len(roi.points) == 0:
            continue
        xs, ys = roi.points[:, 0], roi.points[:, 1]
        sl = np.zeros(image.shape[1:], bool)
        rr, cc = polygon(ys, xs, shape=sl.shape)
        sl[rr, cc] = True
        ok = (ys >= 0) & (ys < sl.shape[0]) & (xs >= 0) & (xs < sl.shape[1])
        sl[ys[ok].round().astype(int), xs[ok].round().astype(int)] = True  # the contour pixels themselves
        mask[k] = mask[k] | sl if roi.inclusion else mask[k] & ~sl
    return mask


@dataclass
class PhysicalNodule:
    """Reader marks of one physical nodule, with its consensus geometry."""

    marks: list[ReaderNodule]
    centroid_world: np.ndarray
    diameter_mm: float            # mean over readers of the volume-equivalent sphere diameter
    axial_diameter_mm: float      # mean over readers of the largest in-plane extent of the contours
    consensus_volume_mm3: float
    consensus_diameter_mm: float  # volume-equivalent diameter of the consensus mask
    consensus_mask: np.ndarray | None = None
    malignancy: float | None = None

    @property
    def n_readers(self) -> int:
        return len({m.reader for m in self.marks})


def _max_axial_diameter(nodule: ReaderNodule, image: Image) -> float:
    best = 0.0
    sy, sx = image.spacing[1], image.spacing[2]
    for r in nodule.rois:
        if r.inclusion and len(r.points) > 1:
            p = r.points * np.array([sx, sy])
            d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)).max()
            best = max(best, float(d))
    return best


def cluster_nodules(ann: LidcAnnotation, image: Image, consensus_level: float = 0.5,
                    include_small: bool = False) -> list[PhysicalNodule]:
    """Group the readers' marks into physical nodules (at most one mark per reader each) and
    build each nodule's consensus mask: voxels marked by at least ``consensus_level`` of the
    readers who marked it."""
    marks = [n for n in ann.nodules if include_small or not n.is_small]
    masks = [reader_mask(n, image) for n in marks]
    cents = []
    for n, m in zip(marks, masks):
        if m.any():
            cents.append(image.voxel_to_world(np.argwhere(m).mean(0)))
        else:
            pts = [(r.points.mean(0), r.z) for r in n.rois if len(r.points)]
            (x, y), z = pts[0]
            k = _slice_index(image, z) or 0
            cents.append(image.voxel_to_world([k, y, x]))
    diam = [_max_axial_diameter(n, image) for n in marks]
    vox = float(np.prod(image.spacing))
    eq = [float((6 * m.sum() * vox / np.pi) ** (1 / 3)) for m in masks]
    clusters: list[list[int]] = []
    for i in np.argsort([-d for d in diam]):  # big marks seed clusters
        placed = False
        for c in clusters:
            if any(marks[j].reader == marks[i].reader for j in c):
                continue
            ref = np.mean([cents[j] for j in c], 0)
            tol = max(5.0, 0.5 * max(diam[j] for j in c))
            if np.linalg.norm(cents[i] - ref) <= tol:
                c.append(int(i))
                placed = True
                break
        if not placed:
            clusters.append([int(i)])
    out = []
    for c in clusters:
        stack = np.stack([masks[j] for j in c])
        cons = stack.mean(0) >= consensus_level if stack.any() else stack[0]
        mal = [m for j in c if (m := marks[j].characteristics.get("malignancy"))]
        out.append(PhysicalNodule(
            marks=[marks[j] for j in c], centroid_world=np.mean([cents[j] for j in c], 0),
            diameter_mm=float(np.mean([eq[j] for j in c])), axial_diameter_mm=float(np.mean([diam[j] for j in c])),
            consensus_volume_mm3=float(cons.sum() * vox),
            consensus_diameter_mm=float((6 * cons.sum() * vox / np.pi) ** (1 / 3)), consensus_mask=cons,
            malignancy=float(np.mean(mal)) if mal else None))
    return sorted(out, key=lambda p: -p.n_readers * 1000 - p.diameter_mm)



def consensus_mask_image(ann: LidcAnnotation, image: Image, consensus_level: float = 0.5,
                         include_small: bool = False) -> Image:
    """A uint8 mask on the scan's grid: 1 where a nodule's consensus (at least ``consensus_level`` of
    the readers who marked it) covers the voxel. Pair it with the scan for segmentation training."""
    mask = np.zeros(image.shape, np.uint8)
    for p in cluster_nodules(ann, image, consensus_level, include_small):
        if p.consensus_mask is not None:
            mask[p.consensus_mask] = 1
    return image.with_array(mask, is_rgb=False, modality="SEG")
