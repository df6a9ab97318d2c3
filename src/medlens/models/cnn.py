"""Compact CNNs: the seed systems' architectures and small fast CNNs for CPU (2D and 3D)."""

from __future__ import annotations

import torch
import torch.nn as nn

from medlens.models.registry import check_min_size, register_model


def _conv(d: int):
    return nn.Conv2d if d == 2 else nn.Conv3d


def _pool(d: int):
    return nn.MaxPool2d if d == 2 else nn.MaxPool3d


def _bn(d: int):
    return nn.BatchNorm2d if d == 2 else nn.BatchNorm3d


def _flat_features(features: nn.Module, in_channels: int, input_size: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, *input_size)).numel())


class SeedCNN(nn.Module):
    """A Keras-style ``features -> flatten -> dense head`` network (``features`` is the conv trunk)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _dense_head_cnn(features: nn.Sequential, in_channels: int, num_outputs: int, input_size, name: str,
                    dense: int, dropout: float) -> SeedCNN:
    """Keras-style: the conv trunk, flatten, Dense(``dense``) + ReLU + dropout, output layer."""
    if input_size is None:
        raise ValueError(f"{name} has a dense head and needs input_size")
    n = _flat_features(features, in_channels, tuple(input_size))
    head = nn.Sequential(nn.Linear(n, dense), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dense, num_outputs))
    return SeedCNN(features, head)


@register_model("fundus_dr_cnn", dims=(2,))
def fundus_dr_cnn(in_channels: int, num_outputs: int, input_size=None, widths=(64, 64, 128, 128),
                  kernels=(7, 5, 5, 5), dense: int = 1024, dropout: float = 0.0) -> nn.Module:
    """Seed diabetic-retinopathy CNN: Conv 64@7x7, 64@5x5, 128@5x5, 128@5x5 (ReLU, max-pool), Dense 1024, output.

    The seed's Keras network, layer for layer: four convolutions ('same' padding, ReLU), each followed by
    2x2 max-pooling, flatten, Dense(1024) + ReLU, and one output unit (the seed's Dense(1, sigmoid): the
    sigmoid is applied by the binary loss and by prediction). No batch normalisation, as in the seed;
    ``dropout`` (default 0, the seed has none) goes before the output layer. Meant for the green channel
    scaled by 1/255 (``data.color: green``, ``data.normalize: none``), Adam at 1e-5.
    """
    if len(widths) != len(kernels):
        raise ValueError(f"fundus_dr_cnn: {len(widths)} widths but {len(kernels)} kernel sizes")
    check_min_size("fundus_dr_cnn", 2 ** len(widths), input_size)  # one 2x2 max-pool per convolution
    layers, c = [], in_channels
    for w, k in zip(widths, kernels):
        layers += [nn.Conv2d(c, int(w), int(k), padding=int(k) // 2), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = int(w)
    return _dense_head_cnn(nn.Sequential(*layers), in_channels, num_outputs, input_size, "fundus_dr_cnn", dense,
                           dropout)


@register_model("luna16_nodule_cnn", dims=(2,))
def luna16_nodule_cnn(in_channels: int, num_outputs: int, input_size=None, dense: int = 64,
                      dropout: float = 0.5) -> nn.Module:
    """Seed LUNA16 nodule patch CNN: conv 32@5x5, 64@5x5, 64@3x3 (ReLU, max-pool), dense, output.

    Designed for 50x50 axial HU patches in a lung window; reproduces the Keras nodule classifier.
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return _dense_head_cnn(features, in_channels, num_outputs, input_size, "luna16_nodule_cnn", dense, dropout)


@register_model("dicom_tutorial_cnn", dims=(2,), min_size=10)  # (conv 3x3 valid, pool) x2
def dicom_tutorial_cnn(in_channels: int, num_outputs: int, input_size=None, dense: int = 128,
                       dropout: float = 0.5) -> nn.Module:
    """Keras-tutorial DICOM CNN: Conv 32@3x3, pool, Conv 64@3x3, pool, Dense 128, dropout, output."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return _dense_head_cnn(features, in_channels, num_outputs, input_size, "dicom_tutorial_cnn", dense, dropout)


@register_model("dicom_tutorial_cnn_deep", dims=(2,))
def dicom_tutorial_cnn_deep(in_channels: int, num_outputs: int, input_size=None, dense: int = 256,
                            dropout: float = 0.5) -> nn.Module:
    """Keras-tutorial DICOM CNN, deeper variant: 3 blocks of two 3x3 convs (32, 64, 128) + pool, Dense 256."""
    layers, c = [], in_channels
    for w in (32, 64, 128):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, padding=1),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    return _dense_head_cnn(nn.Sequential(*layers), in_channels, num_outputs, input_size, "dicom_tutorial_cnn_deep",
                           dense, dropout)


class SmallCNN(nn.Module):
    """Stages of (conv-BN-ReLU) x2 with pooling between stages, global average pool, linear head."""

    def __init__(self, in_channels: int, num_outputs: int, spatial_dims: int = 2, widths=(32, 64, 128),
                 dropout: float = 0.2) -> None:
        super().__init__()
        Conv, BN, Pool = _conv(spatial_dims), _bn(spatial_dims), _pool(spatial_dims)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            if i:
                layers.append(Pool(2))
            layers += [Conv(c, w, 3, padding=1, bias=False), BN(w), nn.ReLU(inplace=True),
                       Conv(w, w, 3, padding=1, bias=False), BN(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@register_model("small_cnn", dims=(2, 3))
def small_cnn(in_channels: int, num_outputs: int, spatial_dims: int = 2, widths=(32, 64, 128),
              dropout: float = 0.2) -> nn.Module:
    """Small fast CNN (3 stages of 2 conv-BN-ReLU, global pool): the CPU workhorse, 2D or 3D."""
    return SmallCNN(in_channels, num_outputs, spatial_dims, tuple(widths), dropout)


@register_model("fast_cnn3d", dims=(3,))
def fast_cnn3d(in_channels: int, num_outputs: int, spatial_dims: int = 3, widths=(16, 32, 64, 128),
               dropout: float = 0.2) -> nn.Module:
    """4-stage 3D CNN sized for CPU (about 200 volumes/s at 28^3 on 2 cores)."""
    return SmallCNN(in_channels, num_outputs, spatial_dims, tuple(widths), dropout)


class OrthogonalSlices(nn.Module):
    """2.5D: the central axial, coronal and sagittal slices of a cube, stacked as channels for a 2D CNN."""

    def __init__(self, in_channels: int, num_outputs: int, widths=(32, 64, 128), dropout: float = 0.2) -> None:
        super().__init__()
        self.cnn = SmallCNN(3 * in_channels, num_outputs, 2, tuple(widths), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[2:]
        if not d == h == w:
            raise ValueError(f"2.5D needs a cubic patch, got {tuple(x.shape[2:])}")
        c = d // 2
        planes = torch.cat([x[:, :, c], x[:, :, :, c], x[:, :, :, :, c]], dim=1)
        return self.cnn(planes)


@register_model("cnn25d", dims=(3,))
def cnn25d(in_channels: int, num_outputs: int, spatial_dims: int = 3, widths=(32, 64, 128),
           dropout: float = 0.2) -> nn.Module:
    """2.5D CNN: central axial/coronal/sagittal slices of a cubic patch as channels of a small 2D CNN."""
    return OrthogonalSlices(in_channels, num_outputs, tuple(widths), dropout)
