"""Self-supervised pretraining (issue 17) on small synthetic arrays: the losses against direct computations,
the backbone's names, reproducibility, pooling and the one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clirun import medlens
from medlens.engine.pretrain import (backbone_state, masked_mse, nt_xent, patch_mask, pretrain_backbone)
from medlens.errors import ConfigError, DataError
from medlens.models import create_model
from medlens.models.transfer import apply_transfer
from medlens.workflow.pretrain import conform, load_source, pretrain, read_sidecar, sha256_file

TINY = {"widths": [4, 8]}


def _npz(path, train, val=None, test=None):
    """A MedMNIST-layout file; val/test default to a few images of the train shape."""
    val = train[:2] if val is None else val
    test = train[:2] if test is None else test
    np.savez(path, train_images=train, train_labels=np.zeros((len(train), 1), np.uint8),
             val_images=val, val_labels=np.zeros((len(val), 1), np.uint8),
             test_images=test, test_labels=np.zeros((len(test), 1), np.uint8))
    return path


def _gray(n=48, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 80, (n, size, size), dtype=np.uint8)
    x[:, 4:12, 4:12] += rng.integers(0, 150, (n, 1, 1), dtype=np.uint8)  # a bright square of varying level
    return x


def _rgb(n=24, size=16, seed=1):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


# --- losses ---------------------------------------------------------------------------------------------

def test_nt_xent_hand_built_case():
    # two orthogonal images, each view identical to its pair: every anchor has cosine 1 with its positive and 0
    # with the two negatives, so each of the 4 terms is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t))
    e = torch.eye(2)
    for t in (0.25, 0.5):
        assert float(nt_xent(e, e.clone(), t)) == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-4)


def test_nt_xent_against_direct_loop():
    g = torch.Generator().manual_seed(3)
    z1, z2, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 0.3
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n, terms = 5, []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        terms.append(-math.log(num / den))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # the positive matters: pairing each view with another image's view raises the loss
    assert float(nt_xent(z1, z1 + 0.01, t)) < float(nt_xent(z1, z1.roll(1, 0), t))


def test_masked_mse_counts_only_masked_pixels():
    target = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :4] = 1  # 16 of 64 pixels of each sample, all 3 channels
    pred = torch.zeros_like(target)
    pred[:, :, :4, :4] = 2.0   # error 2 on the masked pixels
    pred[:, :, 4:, 4:] = 100.0  # huge error on visible pixels: must not count
    assert float(masked_mse(pred, target, mask)) == pytest.approx(4.0)
    pred[:, :, 4:, 4:] = 0.0
    assert float(masked_mse(pred, target, mask)) == pytest.approx(4.0)
    pred[0, 1, 0, 0] = 2.0 + 4.0  # one masked pixel's error 6 instead of 2: +(36-4)/(2*3*16)
    assert float(masked_mse(pred, target, mask)) == pytest.approx(4.0 + 32 / 96)


def test_patch_mask_ratio_and_patches():
    g = torch.Generator().manual_seed(0)
    m = patch_mask((3, 1, 28, 28), 4, 0.6, g)
    assert m.shape == (3, 1, 28, 28)
    per = m.mean(dim=(1, 2, 3))
    assert torch.allclose(per, torch.full((3,), round(0.6 * 49) / 49))  # 29 of 49 patches
    blocks = m.view(3, 1, 7, 4, 7, 4)  # every 4x4 patch all masked or all visible
    assert torch.equal(blocks.amin(dim=(3, 5)), blocks.amax(dim=(3, 5)))
    assert not torch.equal(m[0], m[1])  # drawn per sample
    m3 = patch_mask((2, 1, 8, 8, 8), 4, 0.5, torch.Generator().manual_seed(0))
    assert float(m3.mean()) == pytest.approx(0.5)


# --- the backbone -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_backbone_keys_match_model_and_load(method):
    torch.manual_seed(0)
    net = create_model("small_cnn", 1, 2, 2, (16, 16), **TINY)
    x = torch.from_numpy(_gray(32)[:, None])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = pretrain_backbone(net, x, method, mean=[0.3], std=[0.2], epochs=1, batch_size=16, seed=0, bf16=False)
    own = create_model("small_cnn", 1, 5, 2, (16, 16), **TINY).state_dict()
    expected = [k for k in own if not k.startswith("head.2.")]
    assert list(res.backbone) == expected and res.head == "head.2"
    assert all(res.backbone[k].shape == own[k].shape for k in expected)
    assert any(not torch.equal(res.backbone[k], before[k]) for k in expected if own[k].is_floating_point())
    assert res.n_steps == (4 if method == "simclr" else 2) and len(res.losses) == 1 and math.isfinite(res.losses[0])
    fresh = create_model("small_cnn", 1, 5, 2, (16, 16), **TINY)
    info = apply_transfer_from(fresh, res.backbone)
    assert info["loaded"] == len(expected) and info["n_skipped"] == 0
    assert all(torch.equal(fresh.state_dict()[k], res.backbone[k]) for k in expected)


def apply_transfer_from(net, state, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "b.pt"
        torch.save(state, p)
        return apply_transfer(net, p, [])


def test_mae_feature_map_is_the_spatial_layer():
    from medlens.engine.pretrain import _Tap, head_name

    # a CNN: its last activation before global pooling; a ViT: its declared patch-token grid, not the (heads,
    # tokens, tokens) attention matrices that also look like 2D maps
    for name, fmap, pooled in (("small_cnn", (2, 8, 8, 8), (2, 8)), ("vit", (2, 96, 7, 7), (2, 96))):
        params = TINY if name == "small_cnn" else {}
        size = 16 if name == "small_cnn" else 28
        net = create_model(name, 1, 2, 2, (size, size), **params)
        tap = _Tap(net, head_name(net), 2)
        net.eval()
        net(torch.rand(2, 1, size, size))
        assert tuple(tap.fmap.shape) == fmap and tuple(tap.pooled.shape) == pooled, name


def test_backbone_state_drops_only_the_last_linear():
    net = create_model("dicom_tutorial_cnn", 1, 2, input_size=(28, 28))
    state = backbone_state(net)
    full = net.state_dict()
    head = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    assert set(full) - set(state) == {f"{head}.weight", f"{head}.bias"}
    assert any(isinstance(m, torch.nn.Linear) for n, m in net.named_modules() if f"{n}.weight" in state)


# --- the workflow: pooling, files, reproducibility ---------------------------------------------------------

def test_pretrain_writes_backbone_and_sidecar(tmp_path):
    a = _npz(tmp_path / "gray.npz", _gray(40))
    b = _npz(tmp_path / "colour.npz", _rgb(24), val=np.full((5, 16, 16, 3), 255, np.uint8))
    out = tmp_path / "bb" / "backbone.pt"
    meta = pretrain([str(a), str(b)], method="simclr", model="small_cnn", params=TINY, size=16, epochs=2,
                    batch_size=16, seed=0, precision="32", out=out)
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    side = read_sidecar(out)
    assert side == meta
    assert side["sha256"] == sha256_file(out)
    assert side["n_images"] == 64 and [d["n_images"] for d in side["datasets"]] == [40, 24]
    assert side["splits_used"] == ["train"] and side["labels_used"] is False
    assert side["channels"] == 1 and side["method"] == "simclr" and side["epochs"] == 2
    assert len(side["loss_curve"]) == 2 and side["model"] == {"name": "small_cnn", "params": TINY,
                                                                "head_excluded": "head.2"}
    assert side["n_tensors"] == len(state)
    assert not list(out.parent.glob(".*tmp*"))  # atomic: no temporary file left
    # normalisation statistics are those of the pooled training images (val of b is all 255: not included)
    pooled = np.concatenate([conform(_gray(40)[:, None], 1, 16), conform(_rgb(24).transpose(0, 3, 1, 2), 1, 16)])
    assert side["normalize"]["mean"][0] == pytest.approx(float(pooled.mean()), rel=1e-5)


def test_only_train_images_are_read(tmp_path):
    tr = _gray(10)
    p = _npz(tmp_path / "x.npz", tr, val=np.full((7, 16, 16), 255, np.uint8), test=np.zeros((9, 16, 16), np.uint8))
    src = load_source(str(p), 16)
    assert np.array_equal(src.images, tr[:, None])


def test_channel_conversion_and_resize():
    rgb = np.zeros((1, 3, 4, 4), np.uint8)
    rgb[0, 0] = 255  # pure red
    assert np.allclose(conform(rgb, 1, 4), 0.299)
    gray = np.full((1, 1, 4, 4), 51, np.uint8)
    out = conform(gray, 3, 8)
    assert out.shape == (1, 3, 8, 8) and np.allclose(out, 0.2)


def test_same_seed_same_weights(tmp_path):
    a = _npz(tmp_path / "g.npz", _gray(32))
    kw = dict(model="small_cnn", params=TINY, size=16, epochs=1, batch_size=16, precision="bf16")
    for method in ("simclr", "mae"):
        w = []
        for i, seed in enumerate((0, 0, 1)):
            out = tmp_path / f"{method}{i}.pt"
            pretrain([str(a)], method=method, seed=seed, out=out, **kw)
            w.append(torch.load(out, weights_only=True))
        assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]), method
        assert any(not torch.equal(w[0][k], w[2][k]) for k in w[0] if w[0][k].is_floating_point()), method
        assert sha256_file(tmp_path / f"{method}0.pt") != sha256_file(tmp_path / f"{method}2.pt")


# --- bad input: one line --------------------------------------------------------------------------------

def test_bad_input_errors(tmp_path):
    g = _npz(tmp_path / "g.npz", _gray(8))
    vol = _npz(tmp_path / "vol.npz", np.zeros((6, 8, 8, 8), np.uint8))
    empty = _npz(tmp_path / "empty.npz", np.zeros((0, 16, 16), np.uint8), val=_gray(2), test=_gray(2))
    kw = dict(params=TINY, size=16, epochs=1, batch_size=4, out=tmp_path / "b.pt")
    with pytest.raises(ConfigError, match="unknown pretraining method 'byol'"):
        pretrain([str(g)], method="byol", **kw)
    with pytest.raises(DataError, match="no training images"):
        pretrain([str(empty)], **kw)
    with pytest.raises(DataError, match="no dataset given"):
        pretrain([], **kw)
    with pytest.raises(DataError, match="cannot pool 2D and 3D"):
        pretrain([str(g), str(vol)], **kw)
    with pytest.raises(ConfigError, match="no Linear classification head"):
        pretrain([str(g)], model="unet", params={}, size=16, epochs=1, batch_size=4, out=tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("args,needle", [
    (["--method", "byol"], "unknown pretraining method"),
    (["--model", "unet"], "no Linear classification head"),
    (["VOL"], "cannot pool 2D and 3D"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    g = _npz(tmp_path / "g.npz", _gray(8))
    vol = _npz(tmp_path / "vol.npz", np.zeros((6, 8, 8, 8), np.uint8))
    args = [str(vol) if a == "VOL" else a for a in args]
    r = medlens("pretrain", str(g), *args, "--size", "16", "--epochs", "1", "--out", tmp_path / "b.pt")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_image_folder_source_uses_its_train_split(tmp_path):
    from PIL import Image

    from medlens.config import DataConfig
    from medlens.transforms.preprocess import prepared_data

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            rgb = np.random.default_rng(i + (c == "b") * 100).integers(0, 255, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "imgs" / c / f"{i}.png")
    src = load_source(str(tmp_path / "imgs"), 16, seed=0)
    train = prepared_data(DataConfig(source="folder", path=str(tmp_path / "imgs"), size=16, color="gray")).train
    assert src.images.shape == (len(train), 1, 16, 16) and len(train) < 20
    assert np.array_equal(src.images, train.images)
