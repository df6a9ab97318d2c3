import pytest
import torch

from medlens.errors import ConfigError
from medlens.models import create_model, list_models
from medlens.models.transfer import apply_transfer


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_every_model_runs_forward_and_backward(entry):
    seg = entry.task == "segmentation"
    for dims in entry.dims:
        size = (16, 16, 16) if dims == 3 else (32, 32) if seg else (28, 28)
        m = create_model(entry.name, 1, 3, dims, size)
        x = torch.randn(2, 1, *size)
        out = m(x)
        assert out.shape == ((2, 3, *size) if seg else (2, 3))  # per-voxel logits for segmenters
        out.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_registry_errors():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        create_model("resnet81", 1, 2)
    with pytest.raises(ConfigError, match="2D"):
        create_model("fundus_dr_cnn", 1, 2, spatial_dims=3, input_size=(16, 16, 16))
    with pytest.raises(ConfigError, match="no option"):
        create_model("small_cnn", 1, 2, depth=3)


def test_medmnist_resnet_keeps_resolution_at_28px():
    m = create_model("resnet18", 1, 2, 2, (28, 28))
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    m224 = create_model("resnet18", 3, 2, 2, (224, 224))
    assert m224.conv1.kernel_size == (7, 7)


def test_transfer_learning_loads_and_freezes(tmp_path):
    src = create_model("small_cnn", 1, 5, 2, (28, 28))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = create_model("small_cnn", 1, 2, 2, (28, 28))  # different head size
    info = apply_transfer(dst, tmp_path / "w.pt", ["backbone"])
    assert info["loaded"] > 0 and any("head" in k for k in info["skipped"])
    conv = dict(dst.named_parameters())["features.0.weight"]
    assert torch.equal(conv, dict(src.named_parameters())["features.0.weight"])
    assert not conv.requires_grad
    assert all(p.requires_grad for n, p in dst.named_parameters() if n.startswith("head."))
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_transfer(dst, None, ["nonexistent."])
