"""Segmentation networks: MONAI's UNet and BasicUNet, 2D and 3D, sized for CPU by default."""

from __future__ import annotations

import torch.nn as nn
from monai.networks.nets import BasicUNet, UNet

from medlens.models.registry import register_model


@register_model("unet", dims=(2, 3), task="segmentation")
def unet(in_channels: int, num_outputs: int, spatial_dims: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128),
         strides: tuple[int, ...] | None = None, num_res_units: int = 0, norm: str = "batch",
         dropout: float = 0.0) -> nn.Module:
    """MONAI UNet (strided-conv encoder, transposed-conv decoder); 16-128 channels, 4 levels by default."""
    channels = tuple(int(c) for c in channels)
    strides = tuple(strides) if strides else (2,) * (len(channels) - 1)
    return UNet(spatial_dims, in_channels, num_outputs, channels=channels, strides=strides,
                num_res_units=num_res_units, norm=norm, dropout=dropout)


@register_model("basic_unet", dims=(2, 3), task="segmentation")
def basic_unet(in_channels: int, num_outputs: int, spatial_dims: int = 2,
               features: tuple[int, ...] = (16, 16, 32, 64, 128, 16), norm: str = "batch",
               dropout: float = 0.0) -> nn.Module:
    """MONAI BasicUNet (the original two-conv blocks, max-pool down, 5 levels); needs sizes divisible by 16."""
    return BasicUNet(spatial_dims, in_channels, num_outputs, features=tuple(int(f) for f in features),
                     norm=norm, dropout=dropout)
