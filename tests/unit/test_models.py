import numpy as np
import pytest
import torch

from medlens.errors import ConfigError
from medlens.models import create_model, list_models
from medlens.models.transfer import apply_transfer


BIG = {"inception_v3", "vgg16"}


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_every_model_runs_forward_and_backward(entry):
    seg = entry.task == "segmentation"
    k = 1 if entry.task == "anomaly" else 3   # an autoencoder gives one anomaly score per image
    for dims in entry.dims:
        # the ImageNet architectures need more than 28 px (Inception v3: >= 75; VGG16: five poolings)
        size = (16, 16, 16) if dims == 3 else (32, 32) if seg else (80, 80) if entry.name in BIG else (28, 28)
        m = create_model(entry.name, 1, k, dims, size)
        x = torch.randn(2, 1, *size)
        out = m(x)
        assert out.shape == ((2, k, *size) if seg else (2, k))  # per-voxel logits for segmenters
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


def _module(task="binary", **train):
    from medlens.config import TrainConfig
    from medlens.engine.module import ClassifierModule, ClassifierNet

    net = ClassifierNet(create_model("small_cnn", 1, 1, 2, (28, 28), widths=[4, 8]), [0.0], [1.0])
    return ClassifierModule(net, task, TrainConfig(**train))


def _plateau_lrs(module, values):
    """Learning rates after stepping the configured plateau scheduler with ``values`` (one per epoch)."""
    conf = module.configure_optimizers()
    opt, sch = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for v in values:
        sch.step(v)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_plateau_scheduler_follows_the_monitor():
    improving_loss = [1.0 - 0.05 * i for i in range(10)]  # a val_loss that keeps getting better
    lrs = _plateau_lrs(_module(scheduler="plateau", monitor="val_loss", lr=0.01), improving_loss)
    assert lrs == [0.01] * 10  # never reduced while the loss improves
    worsening_loss = [1.0 + 0.05 * i for i in range(10)]
    assert _plateau_lrs(_module(scheduler="plateau", monitor="val_loss", lr=0.01), worsening_loss)[-1] < 0.01
    improving_auc = [0.5 + 0.04 * i for i in range(10)]
    assert _plateau_lrs(_module(scheduler="plateau", monitor="val_auc", lr=0.01), improving_auc) == [0.01] * 10


def test_segmentation_plateau_scheduler_maximises_dice():
    from medlens.config import SegmentationConfig, TrainConfig
    from medlens.engine.segmentation import SegmentationModule

    net = create_model("basic_unet", 1, 1, 2, (32, 32))
    module = SegmentationModule(net, TrainConfig(scheduler="plateau", lr=0.01), SegmentationConfig(), 1)
    improving_dice = [0.3 + 0.05 * i for i in range(10)]
    assert _plateau_lrs(module, improving_dice) == [0.01] * 10


def _bn_stats(net):
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in net.named_modules()
            if isinstance(m, torch.nn.BatchNorm2d)}


def test_frozen_batchnorm_keeps_its_running_statistics(tmp_path, data_root):
    """Real training steps (Lightning, PneumoniaMNIST) on a net whose first stage is frozen: the frozen BN
    layers keep their statistics, the trainable ones learn theirs, and the head's weights move."""
    import lightning as L

    from medlens.config import TrainConfig
    from medlens.data.medmnist import load_medmnist
    from medlens.engine.module import ClassifierModule, ClassifierNet
    from medlens.engine.sampling import make_loader

    torch.manual_seed(0)
    net = create_model("small_cnn", 1, 1, 2, (28, 28), widths=[4, 8])
    frozen = ["features.0.", "features.1.", "features.3.", "features.4."]  # stage 1: conv-BN-ReLU x2
    info = apply_transfer(net, None, frozen)
    assert info["frozen"] == 1 + 2 + 1 + 2  # two convs (no bias), two BNs (weight and bias)
    before, head = _bn_stats(net), net.head[2].weight.detach().clone()
    module = ClassifierModule(ClassifierNet(net, [0.5], [0.25]), "binary",
                              TrainConfig(lr=0.01, precision="32", scheduler="none"))
    data = load_medmnist("pneumoniamnist")
    train, val = data.train.subset(np.arange(128)), data.val.subset(np.arange(64))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, make_loader(train, 32, "shuffle"), make_loader(val, 64))  # validates between epochs
    after = _bn_stats(net)
    for name in ("features.1", "features.4"):  # frozen: bit for bit as before
        assert all(torch.equal(a, b) for a, b in zip(before[name], after[name])), name
        assert not dict(net.named_modules())[name].training
    for name in ("features.8", "features.11"):  # trainable: updated from the batches
        assert not torch.equal(before[name][0], after[name][0]), name
    assert not torch.equal(head, net.head[2].weight)
    module.train()  # an explicit train() keeps the frozen layers in eval mode too
    assert not net.features[1].training and net.features[8].training
