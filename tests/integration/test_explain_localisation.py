"""Localisation of explanations against LIDC radiologist masks, on the real LUNA16 nodule."""

import numpy as np
import pytest

from medlens.data.lidc import cluster_nodules, parse_lidc_xml
from medlens.data.nodules import extract_patch_2d, nodule_mask_patches, read_candidates
from medlens.explain.faithfulness import localisation
from medlens.io import load


def test_localisation_metric_on_known_maps():
    masks = np.zeros((2, 10, 10), bool)
    masks[:, 2:5, 2:5] = True
    maps = np.zeros((2, 10, 10))
    maps[0, 3, 3], maps[0, 8, 8] = 3.0, 1.0  # max inside, 75% of the energy inside
    maps[1, 8, 8] = 1.0  # max outside
    r = localisation(maps, masks)
    assert r["n"] == 2 and r["pointing_game"] == 0.5 and r["energy_inside"] == pytest.approx(0.375)


def test_lidc_mask_patch_matches_the_image_patch(data_root):
    img = load(data_root / "lidc-idri-0001")
    ann = parse_lidc_xml(next((data_root / "lidc-idri-0001").rglob("*.xml")))
    big = cluster_nodules(ann, img)[0]
    row = read_candidates(data_root / "luna16" / "annotations.csv").iloc[0]
    world = (row.coordX, row.coordY, row.coordZ)
    patch = extract_patch_2d(img, world, 64).astype(float)
    mask = nodule_mask_patches(img, big.consensus_mask, world, dims=2, size=64)
    assert mask[32, 32] and 0.05 < mask.mean() < 0.5
    assert patch[mask].mean() > -150 and patch[mask].mean() - patch[~mask].mean() > 400  # outline = dense nodule
    # a map peaking at the annotated centre hits the radiologists' mask; one peaking in a corner misses
    yy, xx = np.mgrid[:64, :64]
    centred = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * 6.0 ** 2))
    corner = np.exp(-((yy - 4) ** 2 + (xx - 4) ** 2) / (2 * 6.0 ** 2))
    r = localisation(np.stack([centred, corner]), np.stack([mask, mask]))
    assert r["pointing_game"] == 0.5
    assert localisation(centred[None], mask[None])["energy_inside"] > 2 * mask.mean()
