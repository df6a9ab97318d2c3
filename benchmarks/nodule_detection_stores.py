"""Two leave-one-scan-out patch stores for the detection's false-positive reduction (cross-fitting):
A: positives = the LUNA16 nodule of LIDC-IDRI-0001, negatives = 0001's LoG candidates away from it -> test 0002;
B: positives = the 2-reader 24.6 mm nodule of LIDC-IDRI-0002's reader XML (LUNA16 excludes it: < 3 of 4 readers),
   negatives = 0002's LoG candidates away from every reader mark / excluded finding -> test 0001.

    MEDLENS_DATA=../shared/data .venv/bin/python benchmarks/nodule_detection_stores.py   # -> runs/nodules/*.h5
    medlens train configs/luna16_seed_cnn.yaml --run-dir runs/nodules/seedcnn_train0001 \
        --set data.path=runs/nodules/storeA_train0001.h5 --set data.test_patient=<0002 seriesuid>
    medlens train configs/luna16_seed_cnn.yaml --run-dir runs/nodules/seedcnn_train0002 \
        --set data.path=runs/nodules/storeB_train0002.h5 --set data.test_patient=<0001 seriesuid>
    medlens nodules detect $MEDLENS_DATA/lidc-idri-0001 --run runs/nodules/seedcnn_train0002 --out ... (never its own scan)
"""
from pathlib import Path
import numpy as np, pandas as pd
from medlens.io import load
from medlens.imaging.nodules import nodule_candidates
from medlens.data.lidc import parse_lidc_xml, cluster_nodules
from medlens.workflow.nodules import extract_patches

import os
D = Path(os.environ.get("MEDLENS_DATA", "../shared/data")); OUT = Path("runs/nodules"); OUT.mkdir(parents=True, exist_ok=True)
ann = pd.read_csv(D / "luna16/annotations.csv"); u1 = ann.seriesuid[0]
exc = pd.read_csv(D / "luna16/luna16_official_csv/annotations_excluded.csv")
img2 = load(D / "lidc-idri-0002"); u2 = img2.meta["series_uid"]
x2 = parse_lidc_xml(next((D / "lidc-idri-0002").rglob("*.xml")))
marks2 = [p for p in cluster_nodules(x2, img2, include_small=True)]
pos2 = [p for p in marks2 if p.diameter_mm >= 3]
print("0002 reader nodules >= 3 mm:", [(p.n_readers, round(p.diameter_mm, 1)) for p in pos2])
img1 = load(D / "lidc-idri-0001")

def labelled(img, uid, avoid_xyz, avoid_r):
    c = nodule_candidates(img)
    w = c[["coordX", "coordY", "coordZ"]].to_numpy()
    d = np.min([np.linalg.norm(w - a, axis=1) - r for a, r in zip(avoid_xyz, avoid_r)], axis=0)
    neg = c[d > 5.0]  # at least 5 mm outside every nodule / finding
    return pd.DataFrame({"seriesuid": uid, "coordX": neg.coordX, "coordY": neg.coordY, "coordZ": neg.coordZ, "class": 0})

e1 = exc[exc.seriesuid == u1]; e2 = exc[exc.seriesuid == u2]
r = lambda df: [(d if d > 0 else 10.0) / 2 for d in df.diameter_mm]
a1 = [ann.loc[0, ["coordX", "coordY", "coordZ"]].to_numpy(float)] + list(e1[["coordX", "coordY", "coordZ"]].to_numpy())
c1 = labelled(img1, u1, a1, [ann.diameter_mm[0] / 2] + r(e1))
a2 = [p.centroid_world for p in marks2] + list(e2[["coordX", "coordY", "coordZ"]].to_numpy())
c2 = labelled(img2, u2, a2, [max(p.diameter_mm / 2, 5.0) for p in marks2] + r(e2))
print("candidate negatives: 0001", len(c1), "0002", len(c2))
c1.to_csv(OUT / "cands_0001.csv", index=False); c2.to_csv(OUT / "cands_0002.csv", index=False)
ann2 = pd.concat([ann, pd.DataFrame([{"seriesuid": u2, "coordX": p.centroid_world[0], "coordY": p.centroid_world[1],
                                      "coordZ": p.centroid_world[2], "diameter_mm": p.diameter_mm} for p in pos2])])
ann2.to_csv(OUT / "annotations_0002_readers.csv", index=False)
scans = [D / "lidc-idri-0001", D / "lidc-idri-0002"]
ra = extract_patches(scans, D / "luna16/annotations.csv", OUT / "storeA_train0001.h5", candidates=OUT / "cands_0001.csv",
                     neg_ratio=60, negative_scans=True, seed=0)
print("A", ra)
# B: train on 0002 (its reader nodule + candidate negatives); 0001 (with its LUNA16 nodule) is the test patient
rb = extract_patches(scans, OUT / "annotations_0002_readers.csv", OUT / "storeB_train0002.h5",
                     candidates=OUT / "cands_0002.csv", neg_ratio=60, seed=0)
print("B", rb)
