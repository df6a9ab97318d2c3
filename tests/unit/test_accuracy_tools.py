"""Issue 17: the accuracy tools a plan can switch on, each tested on its own (synthetic inputs).

EMA of the weights, mixup/cutmix, progressive resizing, the soft-voting ensemble, flip TTA's flip set,
depth flips, the low-label training subset and the config checks that guard them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medlens.config import AugmentConfig, ProgressiveConfig, TrainConfig, config_from_dict
from medlens.data import label_subset
from medlens.data.base import ArrayDataset
from medlens.engine.module import ClassifierModule, ClassifierNet, ema_update, progressive_size
from medlens.errors import ConfigError
from medlens.models import create_model
from medlens.transforms.augment import BatchAugment, apply_mix, flip_axes, sample_mix, tta_flips


# ------------------------------------------------------------------------------------------- EMA

def test_ema_follows_the_warmup_then_the_decay_and_is_what_the_module_returns():
    net = ClassifierNet(torch.nn.Linear(1, 1, bias=False), [0.0], [1.0])
    with torch.no_grad():
        net.net.weight.fill_(0.0)
    module = ClassifierModule(net, "binary", TrainConfig(ema=0.9))
    expected = None
    for step, w in enumerate([1.0, 2.0, 4.0, 8.0, 16.0]):
        with torch.no_grad():
            net.net.weight.fill_(w)
        module.ema.update_parameters(net)
        if expected is None:       # the first update copies the weights
            expected = w
        else:                      # then ema <- d ema + (1 - d) w, d = min(0.9, (1 + n) / (10 + n))
            d = min(0.9, (1 + step) / (10 + step))
            expected = d * expected + (1 - d) * w
        assert module.ema.module.net.weight.item() == pytest.approx(expected, rel=1e-5)
    raw = net.net.weight.item()
    assert raw == 16.0 and expected != pytest.approx(16.0, abs=1e-3)
    out = module.final_network()
    assert out.net.weight.item() == pytest.approx(expected, rel=1e-5)  # the average, not the last weights


def test_ema_counter_buffers_are_copied_not_averaged():
    update = ema_update(0.99)
    ema, cur = [torch.tensor(3)], [torch.tensor(10)]
    update(ema, cur, torch.tensor(5))
    assert int(ema[0]) == 10
    ema_f, cur_f = [torch.tensor([0.0])], [torch.tensor([1.0])]
    update(ema_f, cur_f, torch.tensor(0))   # n = 0: d = 1/10
    assert float(ema_f[0]) == pytest.approx(0.9)


def test_no_ema_by_default():
    module = ClassifierModule(ClassifierNet(torch.nn.Linear(1, 1), [0.0], [1.0]), "binary", TrainConfig())
    assert module.ema is None


# -------------------------------------------------------------------------------- mixup / cutmix

def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_mixup_is_the_convex_combination_with_the_partner():
    x = torch.arange(4 * 1 * 3 * 3, dtype=torch.float32).view(4, 1, 3, 3)
    p = sample_mix(x.shape, mixup=0.4, cutmix=0.0, generator=_gen(1))
    assert p.method == "mixup" and 0 < p.lam < 1 and sorted(p.perm.tolist()) == [0, 1, 2, 3]
    out = apply_mix(x, p)
    for i in range(4):
        assert torch.allclose(out[i], p.lam * x[i] + (1 - p.lam) * x[int(p.perm[i])])


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_area_outside_it():
    x = torch.stack([torch.full((1, 16, 16), float(i)) for i in range(6)])
    for seed in range(5):
        p = sample_mix(x.shape, mixup=0.0, cutmix=1.0, generator=_gen(seed))
        assert p.method == "cutmix" and len(p.box) == 2
        out = apply_mix(x, p)
        for i in range(6):
            partner = int(p.perm[i])
            pasted = (out[i, 0] == partner) if partner != i else torch.ones(16, 16, dtype=torch.bool)
            if partner != i:
                (y0, y1), (x0, x1) = p.box
                inside = torch.zeros(16, 16, dtype=torch.bool)
                inside[y0:y1, x0:x1] = True
                assert torch.equal(pasted, inside)
                assert 1 - inside.float().mean().item() == pytest.approx(p.lam)
            assert pasted.any() or p.lam == 1.0


def test_cutmix_box_in_3d_and_the_same_generator_gives_the_same_mix():
    shape = (3, 1, 8, 8, 8)
    a = sample_mix(shape, 0.0, 1.0, _gen(7))
    b = sample_mix(shape, 0.0, 1.0, _gen(7))
    assert len(a.box) == 3 and a.box == b.box and a.lam == b.lam and torch.equal(a.perm, b.perm)


def test_with_both_on_each_batch_uses_one_of_the_two_and_both_occur():
    g = _gen(3)
    methods = {sample_mix((8, 1, 8, 8), 0.4, 1.0, g).method for _ in range(40)}
    assert methods == {"mixup", "cutmix"}
    assert sample_mix((8, 1, 8, 8), 0.0, 0.0, g) is None


# --------------------------------------------------------------------------- progressive resizing

def test_progressive_size_rises_linearly_then_stays_full():
    cfg = TrainConfig(epochs=10, progressive=ProgressiveConfig(start=0.5, fraction=0.5))
    assert progressive_size(cfg, 0, (28, 28)) == (14, 14)
    assert progressive_size(cfg, 2, (28, 28)) == (20, 20)      # 0.5 + 0.5 * 2/5 = 0.7 -> 19.6
    assert progressive_size(cfg, 4, (28, 28)) == (25, 25)      # 0.9 -> 25.2
    assert progressive_size(cfg, 5, (28, 28)) is None
    assert progressive_size(TrainConfig(epochs=10), 0, (28, 28)) is None
    assert progressive_size(cfg, 0, (12, 12, 12)) == (8, 8, 8)  # never below 8 voxels


def test_progressive_is_refused_for_a_model_with_a_fixed_input_size(tmp_path):
    from medlens.engine.train import _check_progressive

    ds = ArrayDataset(np.zeros((4, 1, 28, 28), np.uint8), np.array([0, 1, 0, 1]), "binary", ["a", "b"])
    cfg = config_from_dict({"data": {"name": "pneumoniamnist"}, "model": {"name": "dicom_tutorial_cnn"},
                            "train": {"epochs": 4, "progressive": {"start": 0.5}}})
    fixed = ClassifierNet(create_model("dicom_tutorial_cnn", 1, 1, 2, (28, 28)), [0.0], [1.0])
    with pytest.raises(ConfigError, match="does not take"):
        _check_progressive(cfg, fixed, ds)
    pooled = ClassifierNet(create_model("small_cnn", 1, 1, 2, (28, 28), widths=[4, 8]), [0.0], [1.0])
    _check_progressive(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "small_cnn"})}),
                       pooled, ds)


# ------------------------------------------------------------------------------------- ensembles

@pytest.mark.parametrize("outputs,combine", [(1, "sigmoid"), (3, "softmax")])
def test_soft_vote_outputs_the_members_mean_probability(outputs, combine):
    torch.manual_seed(0)
    ens = create_model("ensemble", 1, outputs, 2, (12, 12), member="small_cnn",
                       member_params={"widths": [4, 8]}, k=3, combine=combine).eval()
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        logits = [m(x) for m in ens.members]
        out = ens(x)
    if combine == "sigmoid":
        mean = torch.stack([torch.sigmoid(v) for v in logits]).mean(0)
        assert torch.allclose(torch.sigmoid(out), mean, atol=1e-6)
    else:
        mean = torch.stack([torch.softmax(v, 1) for v in logits]).mean(0)
        assert torch.allclose(torch.softmax(out, 1), mean, atol=1e-6)
    # members differ (different initialisations), so the vote is not any one member
    assert not torch.allclose(logits[0], logits[1])


def test_an_ensemble_state_dict_round_trips_through_the_registry():
    a = create_model("ensemble", 1, 1, 2, (12, 12), member="small_cnn", member_params={"widths": [4, 8]}, k=2)
    b = create_model("ensemble", 1, 1, 2, (12, 12), member="small_cnn", member_params={"widths": [4, 8]}, k=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 12, 12)
    assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError):
        create_model("ensemble", 1, 1, 2, (12, 12), member="ensemble")


# ------------------------------------------------------------------------------------ flips, TTA

def test_tta_flips_are_the_combinations_of_the_training_flips():
    assert tta_flips(AugmentConfig(hflip=0.5), 2) == [(), (-1,)]
    assert tta_flips(AugmentConfig(hflip=0.5, vflip=0.5), 2) == [(), (-1,), (-2,), (-1, -2)]
    assert len(tta_flips(AugmentConfig(hflip=0.5, vflip=0.5, dflip=0.5), 3)) == 8
    assert flip_axes(AugmentConfig(dflip=0.5), 2) == []        # no depth axis in 2D
    assert tta_flips(AugmentConfig(rotate=10), 2) == [()]


def test_dflip_flips_the_depth_axis_of_volumes_only():
    x = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).view(2, 1, 3, 2, 2)
    aug = BatchAugment(AugmentConfig(dflip=1.0))
    out = aug(x, _gen(0))
    assert torch.equal(out, x.flip(-3))
    assert aug.last_params["geometric"].hflip is None
    x2 = torch.arange(8, dtype=torch.float32).view(2, 1, 2, 2)
    assert torch.equal(BatchAugment(AugmentConfig(dflip=1.0))(x2, _gen(0)), x2)


def test_tta_without_a_training_flip_is_a_config_error():
    with pytest.raises(ConfigError, match="evaluation.tta"):
        config_from_dict({"data": {"name": "pneumoniamnist"}, "evaluation": {"tta": True}})
    cfg = config_from_dict({"data": {"name": "pneumoniamnist"}, "evaluation": {"tta": True},
                            "train": {"augment": {"hflip": 0.5}}})
    assert cfg.evaluation.tta


# ------------------------------------------------------------------------------------ low labels

def test_label_subset_keeps_a_stratified_share_of_each_class():
    labels = np.array([0] * 90 + [1] * 10)
    ds = ArrayDataset(np.zeros((100, 1, 4, 4), np.uint8), labels, "binary", ["a", "b"])
    sub = label_subset(ds, 0.1, seed=0)
    assert np.bincount(sub.labels).tolist() == [9, 1]
    one = label_subset(ds, 0.01, seed=0)
    assert np.bincount(one.labels).tolist() == [1, 1]            # at least one per class
    again = label_subset(ds, 0.1, seed=0)
    assert np.array_equal(again.sources, sub.sources)
    assert not np.array_equal(label_subset(ds, 0.1, seed=1).sources, sub.sources)
    assert math.isclose(len(label_subset(ds, 0.5, seed=0)), 50)


def test_config_ranges_of_the_new_options():
    for bad in ({"train": {"ema": 1.0}}, {"train": {"ensemble": 0}}, {"train": {"mixup": -1}},
                {"data": {"name": "x", "label_fraction": 0}}, {"train": {"progressive": {"start": 1.5}}},
                {"train": {"max_minutes": 0}}):
        bad.setdefault("data", {"name": "pneumoniamnist"})
        with pytest.raises(ConfigError):
            config_from_dict(bad)
