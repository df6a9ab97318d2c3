"""MedMNIST-style ResNets (MONAI's ResNet): 3x3 stem, stride 1, no max-pool for small inputs."""

from __future__ import annotations

import torch.nn as nn
from monai.networks.nets import ResNet

from medlens.models.registry import register_model


def _medmnist_resnet(block: str, layers, in_channels: int, num_outputs: int, spatial_dims: int,
                     input_size, small_input: bool | None) -> nn.Module:
    # MedMNIST v2 uses a 3x3 stride-1 stem without max-pooling at 28 px, the standard 7x7/2 + pool at 224.
    if small_input is None:
        small_input = input_size is None or max(input_size) <= 64
    return ResNet(block=block, layers=list(layers), block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
                  n_input_channels=in_channels, conv1_t_size=3 if small_input else 7,
                  conv1_t_stride=1 if small_input else 2, no_max_pool=small_input, num_classes=num_outputs)


@register_model("resnet18", dims=(2, 3))
def resnet18(in_channels: int, num_outputs: int, spatial_dims: int = 2, input_size=None,
             small_input: bool | None = None) -> nn.Module:
    """ResNet-18 (MONAI), MedMNIST-style: 3x3 stride-1 stem and no max-pool at <= 64 px."""
    return _medmnist_resnet("basic", (2, 2, 2, 2), in_channels, num_outputs, spatial_dims, input_size, small_input)


@register_model("resnet50", dims=(2, 3))
def resnet50(in_channels: int, num_outputs: int, spatial_dims: int = 2, input_size=None,
             small_input: bool | None = None) -> nn.Module:
    """ResNet-50 (MONAI), MedMNIST-style: 3x3 stride-1 stem and no max-pool at <= 64 px."""
    return _medmnist_resnet("bottleneck", (3, 4, 6, 3), in_channels, num_outputs, spatial_dims, input_size,
                            small_input)
