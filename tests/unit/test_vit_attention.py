"""The ViT in the registry and its attention explanations (issue 18), checked against MONAI's own outputs."""

import numpy as np
import pytest
import torch

from medlens.engine.module import ClassifierNet
from medlens.errors import ConfigError
from medlens.explain import METHODS, explain
from medlens.models import create_model, get_model_entry


def _vit(dims=2, size=16, **kw):
    torch.manual_seed(0)
    params = {"patch_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_layers": 3, "num_heads": 4, "dropout": 0.0}
    return create_model("vit", 1, 1, dims, (size,) * dims, **(params | kw)).eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_vit_registered_2d_and_3d_and_gives_monai_vits_logits(dims):
    assert get_model_entry("vit").dims == (2, 3)
    net = _vit(dims)
    x = torch.rand((2, 1) + (16,) * dims)
    with torch.no_grad():
        ours = net(x)
        monai_logits, hidden = net.vit(x)  # MONAI's own forward (which our re-trace must equal)
    assert ours.shape == (2, 1) and len(hidden) == 3
    assert torch.allclose(ours, monai_logits, atol=1e-6)


def test_bad_vit_sizes_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="not divisible by patch_size 5"):
        create_model("vit", 1, 1, 2, (28, 28), patch_size=5)
    with pytest.raises(ConfigError, match="hidden_size 30 is not divisible by num_heads 4"):
        create_model("vit", 1, 1, 2, (28, 28), hidden_size=30)


def _numpy_rollout(atts):
    """Abnar & Zuidema's rollout, written independently in numpy from MONAI's saved attention matrices."""
    t = atts[0].shape[-1]
    out = []
    for i in range(atts[0].shape[0]):
        r = np.eye(t)
        for a in atts:
            a = 0.5 * a[i].mean(0) + 0.5 * np.eye(t)
            a = a / a.sum(-1, keepdims=True)
            r = a @ r
        out.append(r[0, 1:])
    return np.stack(out)


def test_attention_rollout_matches_an_independent_rollout_of_monais_saved_attention():
    vit = _vit(2, 16)
    net = ClassifierNet(vit, [0.0], [1.0]).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        net(x)  # save_attn=True: MONAI keeps each block's attention in SABlock.att_mat
    atts = [blk.attn.att_mat.numpy().astype(np.float64) for blk in vit.vit.blocks]
    expected = _numpy_rollout(atts).reshape(2, 4, 4)
    maps, info = explain(net, x, "attention_rollout")
    # the map is the 4x4 patch grid's CLS row, bilinearly upsampled to the 16 px input
    want = torch.nn.functional.interpolate(torch.from_numpy(expected)[:, None].float(), size=(16, 16),
                                           mode="bilinear", align_corners=False)[:, 0].numpy()
    assert maps.shape == (2, 16, 16)
    assert np.allclose(maps, want, rtol=1e-4, atol=1e-6)


def test_attention_gradcam_is_class_specific_and_finite():
    net = ClassifierNet(_vit(2, 16), [0.0], [1.0]).eval()
    x = torch.rand(2, 1, 16, 16)
    m1, _ = explain(net, x, "attention_gradcam", target=1)
    m0, _ = explain(net, x, "attention_gradcam", target=0)
    assert m1.shape == (2, 16, 16) and np.isfinite(m1).all() and m1.min() >= 0
    assert not np.allclose(m0, m1)  # ReLU(grad x attention): the gradient's sign differs between the classes


def test_gradcam_on_a_vit_uses_the_patch_grid_and_cam_is_refused():
    net = ClassifierNet(_vit(2, 16), [0.0], [1.0]).eval()
    x = torch.rand(1, 1, 16, 16)
    maps, info = explain(net, x, "gradcam", target=1)
    assert info["layer"] == "patch_grid" and maps.shape == (1, 16, 16)
    with pytest.raises(ConfigError, match="CLS token"):
        explain(net, x, "cam")


@pytest.mark.parametrize("method", ["attention_rollout", "attention_gradcam"])
def test_attention_on_a_cnn_is_a_one_line_error(method):
    cnn = ClassifierNet(create_model("small_cnn", 1, 1, 2, (28, 28)), [0.0], [1.0]).eval()
    with pytest.raises(ConfigError, match="needs a transformer model") as e:
        explain(cnn, torch.rand(1, 1, 28, 28), method)
    assert "\n" not in str(e.value)


def test_explain_list_shows_the_attention_methods():
    from typer.testing import CliRunner

    from medlens.cli.main import app

    res = CliRunner().invoke(app, ["explain", "--list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "attention_rollout" in res.output and "attention_gradcam" in res.output and "gradcam" in res.output
    assert METHODS["attention_rollout"].attention and not METHODS["gradcam"].attention
