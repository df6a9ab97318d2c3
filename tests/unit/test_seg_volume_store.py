"""3D segmentation cases in the volume store (issue 27 item 3): prepared once, patches read chunk by chunk, the same
patches as from memory for the same seed, one changed mask file rebuilds its case only. Tiny synthetic volumes written
by SimpleITK in ``tmp_path``; the store is a folder of ``tmp_path``."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medlens.config import DataConfig
from medlens.data.segmentation import PatchSampler, case_key, channel_stats, load_case
from medlens.data.volume_store import CHUNKS
from medlens.transforms.preprocess import Preparer, segmentation_spec

PATCH = (8, 32, 32)


def _write(path, arr, spacing=(0.8, 0.7, 2.5), origin=(-40.0, 12.0, 7.5)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)  # (x, y, z)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def _volumes(tmp_path):
    """Three image/mask pairs: two that span several chunks on every axis, one smaller than the patch in x (padded)."""
    rng = np.random.default_rng(11)
    out = []
    for name, shape, blobs in (("a", (40, 150, 140), [(5, 20, 30, 60, 100, 110)]),
                               ("b", (36, 140, 130), [(20, 30, 90, 110, 10, 30), (2, 4, 5, 9, 120, 128)]),
                               ("c", (12, 40, 20), [(3, 6, 10, 14, 4, 9)])):
        img = rng.normal(300, 80, shape).astype(np.float32)
        mask = np.zeros(shape, np.uint8)
        for z0, z1, y0, y1, x0, x1 in blobs:
            mask[z0:z1, y0:y1, x0:x1] = 1
            img[z0:z1, y0:y1, x0:x1] += 200
        out.append((_write(tmp_path / f"{name}.nii.gz", img), _write(tmp_path / f"{name}_seg.nrrd", mask)))
    return out


def _load(pairs, cfg, prep, store=None):
    return [load_case(i, m, cfg, None, "p", prep, store=store) for i, m in pairs]


@pytest.fixture()
def setup(tmp_path):
    pairs = _volumes(tmp_path)
    cfg = DataConfig(source="folder", path=str(tmp_path), intensity="unit")
    prep = Preparer(segmentation_spec(cfg, 3), scale=True)
    return pairs, cfg, prep, tmp_path / "store"


def test_stored_patches_equal_in_memory_ones_and_read_only_their_chunks(setup):
    pairs, cfg, prep, store = setup
    memory, stored = _load(pairs, cfg, prep), _load(pairs, cfg, prep, store)
    assert all(c.stored is None for c in memory) and all(c.stored is not None for c in stored)
    for m, s in zip(memory, stored):  # the whole case reads back as prepared
        assert np.array_equal(m.image, s.image) and np.array_equal(m.mask, s.mask)
        assert m.has_foreground == s.has_foreground and m.max_label == s.max_label == 1
        np.testing.assert_allclose(s.geometry.spacing, m.geometry.spacing)
        np.testing.assert_allclose(s.geometry.origin, m.geometry.origin)

    with pytest.warns(UserWarning, match=r"c\.nii\.gz .* smaller than the patch"):
        mem = PatchSampler(memory, PATCH, 30, 0.6, seed=4)
    with pytest.warns(UserWarning, match=r"c\.nii\.gz .* smaller than the patch"):
        sto = PatchSampler(stored, PATCH, 30, 0.6, seed=4)
    with_fg = 0
    for epoch in (0, 1):
        mem.set_epoch(epoch)
        sto.set_epoch(epoch)
        for i in range(len(mem)):
            (xm, ym), (xs, ys) = mem[i], sto[i]
            assert xs.shape == (1, *PATCH) and torch.equal(xm, xs) and torch.equal(ym, ys)
            with_fg += int(ym.any())
    assert 20 < with_fg < 60  # foreground-centred and random draws both taken
    shipped = pickle.dumps(sto)  # to DataLoader workers: the stored cases travel as paths, not voxels
    assert len(shipped) < 20_000 and all(torch.equal(pickle.loads(shipped)[i][0], sto[i][0]) for i in (0, 1, 2))

    # one patch of case a (index 0 of epoch 0): the image and mask chunks it overlaps, each read once, nothing else
    sto.set_epoch(0)
    case_a = stored[0].stored
    assert case_a is not None
    vols = (case_a.image, case_a.mask)
    for v in vols:
        v.chunk_reads = 0
    x, _ = sto[0]
    whole = memory[0].image[0]
    at = lambda s: tuple(slice(a, a + p) for a, p in zip(s, PATCH))  # noqa: E731
    found = [s for s in np.argwhere(whole == x[0, 0, 0, 0].item()) if np.array_equal(whole[at(s)], x[0].numpy())]
    assert len(found) == 1  # random intensities: where the patch was cut
    start = found[0]
    touched = math.prod((a + p - 1) // c - a // c + 1 for a, p, c in zip(start, PATCH, CHUNKS))
    total = math.prod(-(-n // c) for n, c in zip(whole.shape, CHUNKS))
    assert total == 27 and 1 <= touched <= 8
    assert [v.chunk_reads for v in vols] == [touched, touched]

    # data.normalize: dataset over stored cases, one case at a time: numpy's float32 mean/std of the concatenation
    (m_sto, s_sto), (m_mem, s_mem) = channel_stats(stored), channel_stats(memory)
    assert 0.2 < m_mem[0] < 0.8 and 0.02 < s_mem[0] < 0.5  # min-max scaled intensities: not a trivial 0 / 1
    assert (m_sto, s_sto) == (m_mem, s_mem)  # bit for bit: the same network normalisation, the same weights


def test_changed_mask_rebuilds_that_case_only(setup):
    pairs, cfg, prep, store = setup
    pairs = pairs[:2]
    _load(pairs, cfg, prep, store)
    stat = lambda: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.glob("*.b2nd")}  # noqa: E731
    before = stat()
    keys = [case_key(i, m, None, None) for i, m in pairs]
    assert len(before) == 8 and all(sum(n.startswith(k) for n in before) == 4 for k in keys)

    again = _load(pairs, cfg, prep, store)  # nothing changed: nothing written
    assert stat() == before and all(c.stored is not None for c in again)

    mask_b = sitk.GetArrayFromImage(sitk.ReadImage(str(pairs[1][1])))
    mask_b[30:34, 60:70, 60:70] = 1
    old = pairs[1][1].stat().st_mtime_ns
    _write(pairs[1][1], mask_b)
    os.utime(pairs[1][1], ns=(old + 10**9, old + 10**9))  # a later mtime, whatever the clock's resolution
    a, b = _load(pairs, cfg, prep, store)
    after = stat()
    new_b = case_key(pairs[1][0], pairs[1][1], None, None)
    assert new_b != keys[1] and case_key(pairs[0][0], pairs[0][1], None, None) == keys[0]
    assert {n: after[n] for n in before if n.startswith(keys[0])} == {n: v for n, v in before.items()
                                                                      if n.startswith(keys[0])}  # a untouched
    assert sum(n.startswith(new_b) for n in after) == 4 and np.array_equal(b.mask, mask_b)

    # a case cut short before its mask (written last) was renamed is prepared again
    (store / f"{new_b}.mask.b2nd").unlink()
    _, b2 = _load(pairs, cfg, prep, store)
    assert b2.stored is not None and np.array_equal(b2.mask, mask_b)
    assert stat()[f"{keys[0]}.image.b2nd"] == before[f"{keys[0]}.image.b2nd"]
