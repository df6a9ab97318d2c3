"""VGG16 and Inception v3 take ImageNet state dicts in torchvision's layout, mapped by name.

torchvision is not installed (and nothing is downloaded): the layout is checked against torchvision's
published facts (its documented parameter counts, 138,357,544 and 27,161,264, and named tensors with
their shapes), then a randomly initialised state dict in that layout is saved, loaded through
``model.pretrained``'s path (``apply_transfer``) and found in the network, tensor for tensor.
"""

import torch

from medlens.models import create_model
from medlens.models.transfer import apply_transfer

# names and shapes as torchvision's vgg16 / inception_v3 state dicts hold them (num_classes=1000)
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
INCEPTION_NAMED = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked": (),
    "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
    "AuxLogits.fc.weight": (1000, 768),
    "fc.weight": (1000, 2048),
}


def torchvision_vgg16_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of torchvision's VGG16 state dict, written from its layout (not from medlens)."""
    shapes = {}
    for i, cin, cout in VGG16_CONVS:
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (cout, cin, 3, 3), (cout,)
    for i, (nin, nout) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000))):
        shapes[f"classifier.{i}.weight"], shapes[f"classifier.{i}.bias"] = (nout, nin), (nout,)
    return shapes


def random_state_dict(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.empty(s).normal_(0, 0.05, generator=gen) for k, s in shapes.items()}


def empty_model(*args, **kw) -> torch.nn.Module:
    """A model with uninitialised CPU tensors: built on the meta device, so no 100M-weight init is paid."""
    with torch.device("meta"):
        net = create_model(*args, **kw)
    return net.to_empty(device="cpu")


def test_layouts_match_torchvision():
    with torch.device("meta"):  # shapes only
        vgg = create_model("vgg16", 3, 1000, 2, (224, 224))
        inc = create_model("inception_v3", 3, 1000, 2, (299, 299), aux_logits=True)
    assert sum(p.numel() for p in vgg.parameters()) == 138_357_544
    assert {k: tuple(v.shape) for k, v in vgg.state_dict().items()} == \
        torchvision_vgg16_shapes()
    assert sum(p.numel() for p in inc.parameters()) == 27_161_264
    sd = inc.state_dict()
    for name, shape in INCEPTION_NAMED.items():
        assert tuple(sd[name].shape) == shape, name


def test_vgg16_loads_an_imagenet_state_dict_by_name(tmp_path):
    src = random_state_dict(torchvision_vgg16_shapes(), 1)
    torch.save(src, tmp_path / "vgg16-imagenet.pth")
    net = empty_model("vgg16", 1, 1, 2, (64, 64))  # a one-channel binary classifier
    info = apply_transfer(net, tmp_path / "vgg16-imagenet.pth", [])
    own = net.state_dict()
    # every tensor but the 1000-class output layer is taken; the RGB first conv is summed for gray input
    assert info["loaded"] == 30 and info["adapted"] == ["features.0.weight"]
    assert sorted(info["skipped"]) == ["classifier.6.bias", "classifier.6.weight"]
    assert torch.equal(own["features.0.weight"], src["features.0.weight"].sum(1, keepdim=True))
    for i, _, _ in VGG16_CONVS[1:]:
        assert torch.equal(own[f"features.{i}.weight"], src[f"features.{i}.weight"])
    assert torch.equal(own["classifier.3.weight"], src["classifier.3.weight"])
    x = torch.rand(1, 1, 64, 64)  # a gray image gives what the RGB first layer gives its gray replica
    with torch.no_grad():
        a = net.features[0](x)
        b = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), src["features.0.weight"], src["features.0.bias"],
                                       padding=1)
    assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_inception_v3_loads_an_imagenet_state_dict_by_name(tmp_path):
    torch.manual_seed(2)
    src_net = empty_model("inception_v3", 3, 1000, 2, (299, 299), aux_logits=True)
    for v in src_net.state_dict().values():  # random, running statistics included
        if v.is_floating_point():
            v.uniform_(0.5, 1.5)
        else:
            v.fill_(7)
    src = src_net.state_dict()
    torch.save(src, tmp_path / "inception_v3_google.pth")
    net = create_model("inception_v3", 3, 2, 2, (96, 96))  # RGB, two classes, no auxiliary head
    info = apply_transfer(net, tmp_path / "inception_v3_google.pth", ["backbone"])
    skipped = {k for k in src if k.startswith("AuxLogits.")} | {"fc.weight", "fc.bias"}
    assert info["n_skipped"] == len(skipped) and info["adapted"] == []
    assert info["loaded"] == len(src) - len(skipped) == len(net.state_dict()) - 2
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in src.items() if k not in skipped)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert net(torch.rand(2, 3, 96, 96)).shape == (2, 2)
