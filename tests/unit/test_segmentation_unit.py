"""Segmentation building blocks on small synthetic images: metrics vs MONAI, empty-mask semantics,
sliding-window inference, post-processing, augmentation alignment, input checks."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from medlens.errors import DataError, ShapeError
from medlens.evaluation.segmetrics import case_metrics, cldice, summarize


def _blob(shape, centre, radius, spacing=None):
    grids = np.meshgrid(*[np.arange(s) * (spacing[i] if spacing else 1.0) for i, s in enumerate(shape)],
                        indexing="ij")
    c = [centre[i] * (spacing[i] if spacing else 1.0) for i in range(len(shape))]
    return sum((g - ci) ** 2 for g, ci in zip(grids, c)) <= radius ** 2


def _monai(pred, ref, spacing):
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    oh = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    p, r = oh(pred), oh(ref)
    dice = DiceMetric(include_background=False, ignore_empty=False)(p, r).item()
    hd = HausdorffDistanceMetric(include_background=False, percentile=95)(p, r, spacing=spacing).item()
    msd = SurfaceDistanceMetric(include_background=False, symmetric=True)(p, r, spacing=spacing).item()
    return dice, hd, msd


@pytest.mark.parametrize("shape,spacing", [((64, 80), (0.7, 1.3)), ((20, 40, 36), (2.5, 0.8, 0.8))])
def test_metrics_agree_with_monai(shape, spacing):
    rng = np.random.default_rng(0)
    for trial in range(4):
        c1 = [s * rng.uniform(0.35, 0.65) for s in shape]
        c2 = [c + rng.uniform(-3, 3) for c in c1]
        ref = _blob(shape, c1, rng.uniform(8, 12), spacing)
        pred = _blob(shape, c2, rng.uniform(6, 12), spacing) | _blob(shape, [s * 0.15 for s in shape], 3, spacing)
        ours = case_metrics(pred, ref, spacing)
        d, hd, msd = _monai(pred, ref, list(spacing))
        assert ours["dice"] == pytest.approx(d, abs=1e-6)
        assert ours["hd95"] == pytest.approx(hd, rel=1e-5)
        assert ours["msd"] == pytest.approx(msd, rel=1e-5)
        assert ours["hd95"] > 0 and ours["msd"] > 0


def test_spacing_changes_distances_in_mm():
    ref = np.zeros((40, 40), bool)
    ref[10:20, 10:20] = True
    pred = np.roll(ref, 4, axis=1)  # 4 px to the right
    px = case_metrics(pred, ref)
    mm = case_metrics(pred, ref, spacing=(1.0, 0.5))
    assert px["hd95"] == pytest.approx(4.0)
    assert mm["hd95"] == pytest.approx(2.0)
    assert px["dice"] == mm["dice"] == pytest.approx(0.6)


def test_empty_mask_semantics():
    z = np.zeros((16, 16), bool)
    m = z.copy()
    m[4:8, 4:8] = True
    both = case_metrics(z, z)
    assert (both["dice"], both["iou"], both["hd95"], both["msd"]) == (1.0, 1.0, 0.0, 0.0)
    ref_empty = case_metrics(m, z)
    assert ref_empty["dice"] == 0 and ref_empty["precision"] == 0
    assert np.isnan(ref_empty["sensitivity"]) and np.isnan(ref_empty["hd95"])
    pred_empty = case_metrics(z, m)
    assert pred_empty["dice"] == 0 and pred_empty["sensitivity"] == 0 and np.isnan(pred_empty["precision"])
    # both-empty Dice is what MONAI gives with ignore_empty=False
    from monai.metrics import DiceMetric

    oh = torch.from_numpy(np.stack([~z, z])[None].astype(np.float32))
    assert DiceMetric(include_background=False, ignore_empty=False)(oh, oh).item() == 1.0
    # summaries average defined values and count them
    s = summarize([both, ref_empty, pred_empty], n_boot=0)
    assert s["dice"]["value"] == pytest.approx(1 / 3)
    assert s["hd95"]["n_defined"] == 1 and s["hd95"]["value"] == 0.0


def test_cldice_rewards_connected_centrelines():
    ref = np.zeros((40, 60), bool)
    ref[18:22, 5:55] = True
    assert cldice(ref, ref) == pytest.approx(1.0)
    broken = ref.copy()
    broken[:, 28:32] = False  # a gap: small Dice loss, centre line partly missed
    thick = np.zeros_like(ref)
    thick[16:24, 5:55] = True  # too thick: the centre line is still all covered
    assert cldice(thick, ref) > cldice(broken, ref)
    assert case_metrics(thick, ref, with_cldice=True)["cldice"] == pytest.approx(1.0)


def test_patient_bootstrap_moves_cases_together():
    rows = [{"dice": v} for v in (0.9, 0.9, 0.5, 0.5, 0.7, 0.7)]
    s = summarize(rows, ["a", "a", "b", "b", "c", "c"], n_boot=500)
    assert s["dice"]["value"] == pytest.approx(0.7)
    assert s["dice"]["ci_low"] < 0.7 < s["dice"]["ci_high"]
    s_const = summarize([{"dice": 0.8}] * 4, ["a", "a", "b", "b"], n_boot=200)
    assert s_const["dice"]["ci_low"] == s_const["dice"]["ci_high"] == pytest.approx(0.8)


def _net(dims=2):
    from medlens.engine.module import ClassifierNet
    from medlens.models import create_model

    torch.manual_seed(0)
    net = ClassifierNet(create_model("unet", 1, 1, dims, None, channels=[4, 8, 16]), [0.3], [0.2])
    return net.eval()


@pytest.mark.parametrize("dims,size", [(2, (64, 64)), (3, (16, 32, 32))])
def test_sliding_window_equals_whole_image_when_it_fits(dims, size):
    from medlens.engine.segmentation import predict_probs, to_probs

    net = _net(dims)
    img = np.random.default_rng(1).random((1, *size)).astype(np.float32)
    sw = predict_probs(net, img, size, overlap=0.5, blend="gaussian")
    with torch.no_grad():
        whole = to_probs(net(torch.from_numpy(img)[None]))[0].numpy()
    np.testing.assert_allclose(sw, whole, atol=1e-5)
    assert sw.shape == (2, *size)


def test_sliding_window_blends_large_images_and_tta_is_flip_invariant():
    from medlens.engine.segmentation import predict_probs

    net = _net(2)
    img = np.random.default_rng(2).random((1, 100, 150)).astype(np.float32)
    p = predict_probs(net, img, (64, 64), overlap=0.5)
    assert p.shape == (2, 100, 150) and np.allclose(p.sum(0), 1, atol=1e-5)
    img = img[:, :96, :128]  # window starts 0/32 and 0/32/64: a grid symmetric under flips
    p = predict_probs(net, img, (64, 64), overlap=0.5)
    t1 = predict_probs(net, img, (64, 64), overlap=0.5, tta=True)
    t2 = predict_probs(net, img[:, :, ::-1].copy(), (64, 64), overlap=0.5, tta=True)[:, :, ::-1]
    assert not np.allclose(t1, p, atol=1e-4)  # TTA changes the output ...
    np.testing.assert_allclose(t1, t2, atol=1e-5)  # ... and makes it equivariant to a flip


def test_image_smaller_than_patch_is_padded_with_warning():
    from medlens.data.segmentation import PatchSampler, SegCase
    from medlens.engine.segmentation import predict_probs
    from medlens.io.image import Image

    net = _net(2)
    img = np.random.default_rng(3).random((1, 40, 50)).astype(np.float32)
    with pytest.warns(UserWarning, match="smaller than the patch"):
        p = predict_probs(net, img, (64, 64))
    assert p.shape == (2, 40, 50)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 10:20] = 1
    case = SegCase("small", "p", img, mask, Image(mask), __import__("pathlib").Path("small.png"))
    with pytest.warns(UserWarning, match="small.png .* smaller than the patch"):
        s = PatchSampler([case], (64, 64), 8, 1.0, seed=0)
    x, y = s[0]
    assert x.shape == (1, 64, 64) and int(y.sum()) == 100  # padded, the whole lesion kept


def test_patch_sampler_is_reproducible_and_foreground_weighted():
    from pathlib import Path

    from medlens.data.segmentation import PatchSampler, SegCase
    from medlens.io.image import Image

    mask = np.zeros((200, 200), np.uint8)
    mask[150:160, 20:30] = 1
    img = np.random.default_rng(0).random((1, 200, 200)).astype(np.float32)
    cases = [SegCase("a", "p", img, mask, Image(mask), Path("a.png"))]
    s1, s2 = PatchSampler(cases, (32, 32), 100, 1.0, seed=5), PatchSampler(cases, (32, 32), 100, 1.0, seed=5)
    assert all(torch.equal(s1[i][0], s2[i][0]) for i in range(5))
    assert all(s1[i][1].sum() > 0 for i in range(100))  # ratio 1: every patch holds foreground
    s0 = PatchSampler(cases, (32, 32), 100, 0.0, seed=5)
    assert np.mean([s0[i][1].sum() > 0 for i in range(100)]) < 0.3
    s1.set_epoch(1)
    assert not torch.equal(s1[0][0], s2[0][0])


def test_augmentation_keeps_image_and_mask_aligned():
    from medlens.config import AugmentConfig
    from medlens.engine.segmentation import augment_pair
    from medlens.transforms.augment import BatchAugment

    y = torch.zeros(8, 32, 32, dtype=torch.long)
    y[:, 4:12, 6:20] = 1
    y[:, 20:30, 3:6] = 1
    x = y[:, None].float()
    aug = BatchAugment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=True, rotate=20, scale=0.1))
    xa, ya = augment_pair(aug, x, y, 1, torch.Generator().manual_seed(0))
    assert not torch.equal(ya, y)
    assert ((xa[:, 0] > 0.5).long() == ya).float().mean() > 0.999
    y3 = y.clone()
    y3[:, 20:30, 3:6] = 2
    xa, ya = augment_pair(aug, y3[:, None].float(), y3, 3, torch.Generator().manual_seed(0))
    assert set(torch.unique(ya).tolist()) == {0, 1, 2}
    # the image channel interpolates 0 -> 2 through 1 at edges; the one-hot mask does not
    assert (xa[:, 0].round().long() == ya).float().mean() > 0.97


def test_postprocess_threshold_components_and_size():
    from medlens.engine.segmentation import postprocess
    from medlens.evaluation.threshold import choose_dice_threshold as choose_threshold

    p = np.zeros((2, 30, 30), np.float32)
    p[1, 2:12, 2:12] = 0.9   # 100 px
    p[1, 20:25, 20:25] = 0.6  # 25 px
    p[1, 28, 28] = 0.95       # 1 px
    p[0] = 1 - p[1]
    assert postprocess(p, 0.5).sum() == 126
    assert postprocess(p, 0.7).sum() == 101
    assert postprocess(p, 0.5, largest_components=1).sum() == 100
    assert postprocess(p, 0.5, min_size=2).sum() == 125
    ref = p[1] >= 0.55
    ref[28, 28] = False
    q = np.where(p[1] > 0, p[1], 0.3)  # background at 0.3: thresholds <= 0.3 take the whole image
    t, d = choose_threshold([q], [ref])
    assert 0.3 < t <= 0.6 and d > 0.99


def test_mask_checks_name_the_file(tmp_path):
    from medlens.data.segmentation import check_same_grid, mask_to_classes
    from medlens.io.image import Image

    with pytest.raises(DataError, match=r"m.png: mask values \[3\] are outside the label set \[0, 1, 2\]"):
        mask_to_classes(np.array([[0, 1], [2, 3]], np.uint8), [0, 1, 2], "m.png")
    with pytest.raises(DataError, match="not binary"):
        mask_to_classes(np.array([[0, 1], [2, 0]], np.uint8), None, "m.png")
    assert mask_to_classes(np.array([[0, 255]], np.uint8), None, "m.png").tolist() == [[0, 1]]
    assert mask_to_classes(np.array([[10, 30]], np.uint8), [10, 20, 30], "m.png").tolist() == [[0, 2]]
    img = Image(np.zeros((4, 10, 10)), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(ShapeError, match=r"lab.nii: mask grid \(4, 10, 12\) differs"):
        check_same_grid(img, Image(np.zeros((4, 10, 12))), "lab.nii")
    with pytest.raises(ShapeError, match="mask spacing"):
        check_same_grid(img, Image(np.zeros((4, 10, 10)), spacing=(1.0, 1.0, 1.0)), "lab.nii")
    with pytest.raises(ShapeError, match="mask origin"):
        check_same_grid(img, Image(np.zeros((4, 10, 10)), spacing=(2.0, 1.0, 1.0), origin=(0, 0, 5.0)), "lab.nii")


def test_patient_split_never_shares_a_patient():
    from medlens.data.segmentation import patient_of
    from medlens.data.splits import patient_split

    def split_cases(patients, val, test, seed):  # boolean masks over cases from the one splitter
        idx = patient_split(None, patients, val=val, test=test, seed=seed)
        return [np.isin(np.arange(len(patients)), i) for i in idx]

    names = [f"Image_{i:02d}{e}.jpg" for i in range(1, 15) for e in "LR"]
    pats = [patient_of(n, r"Image_(\d+)[LR]") for n in names]
    assert len(set(pats)) == 14
    tr, va, te = split_cases(pats, 0.15, 0.28, seed=0)
    assert (tr.astype(int) + va + te == 1).all()
    sets = [{p for p, s in zip(pats, m) if s} for m in (tr, va, te)]
    assert [len(s) for s in sets] == [8, 2, 4]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with pytest.raises(DataError, match="at least 3 patients"):
        split_cases(["a", "a", "b"], 0.2, 0.2, 0)


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal", "dice", "focal", "tversky", "ce"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_losses_prefer_the_right_answer(loss, n_out):
    from medlens.config import SegmentationConfig
    from medlens.engine.segmentation import make_loss

    crit = make_loss(SegmentationConfig(loss=loss), n_out)
    y = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    y[:, :, 4:10, 4:10] = 1
    if n_out == 3:
        y[:, :, 12:15, 2:6] = 2
        good = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float() * 8 - 4
    else:
        good = y.float() * 8 - 4
    bad = -good
    lg, lb = crit(good, y), crit(bad, y)
    assert torch.isfinite(lg) and lg < lb
    logits = torch.zeros_like(good, requires_grad=True)
    crit(logits, y).backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dims,size", [(2, (32, 48)), (3, (16, 16, 32))])
def test_basic_unet_builds_and_keeps_the_grid(dims, size):
    from medlens.models import create_model

    net = create_model("basic_unet", 2, 3, dims, None, features=[4, 4, 8, 8, 16, 4]).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 2, *size))
    assert out.shape == (1, 3, *size)
