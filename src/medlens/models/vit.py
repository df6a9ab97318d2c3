"""Vision transformer (MONAI ``ViT``), 2D and 3D, as a classifier with a CLS token.

MONAI's ``ViT.forward`` returns ``(logits, hidden_states)``; ``ViTClassifier`` returns the logits only,
so it trains, predicts and explains like every other registered classifier. ``save_attn=True`` keeps
each block's attention matrix (``SABlock.att_mat``), which the attention explanations
(``medlens.explain.methods``: attention rollout, gradient-weighted attention) read.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import ViT

from medlens.errors import ConfigError
from medlens.models.registry import register_model


class PatchGrid(nn.Module):
    """Patch tokens (N, T, D) -> feature map (N, D, *grid): the ViT's spatial layer for Grad-CAM & co.
    (``cam_target``: ``explain.layers.find_target_layer`` prefers it to the attention matrices)."""

    cam_target = True

    def __init__(self, grid: tuple[int, ...]) -> None:
        super().__init__()
        self.grid = tuple(grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape((tokens.shape[0], tokens.shape[2]) + self.grid)


class ViTClassifier(nn.Module):
    """MONAI ViT with a linear head on the CLS token; ``forward`` gives logits (N, num_outputs).

    MONAI's ``ViT.forward`` is re-traced here (patch embedding, CLS token, blocks, norm, head) with one
    addition: the tokens entering the last block pass through ``PatchGrid`` and back, an identity that gives
    CAM methods a spatial map. (The last block's own patch outputs cannot serve: only its CLS output reaches
    the head, so their gradient is zero.)
    """

    def __init__(self, vit: ViT, grid: tuple[int, ...]) -> None:
        super().__init__()
        self.vit = vit
        self.grid = tuple(int(g) for g in grid)   # patch grid, e.g. (7, 7) for 28 px and 4 px patches
        self.patch_grid = PatchGrid(self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embedding(x)
        x = torch.cat((v.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in v.blocks[:-1]:
            x = blk(x)
        fmap = self.patch_grid(x[:, 1:])
        x = torch.cat((x[:, :1], fmap.flatten(2).transpose(1, 2)), dim=1)
        x = v.norm(v.blocks[-1](x))
        return v.classification_head(x[:, 0])


@register_model("vit", dims=(2, 3))
def vit(in_channels: int, num_outputs: int, spatial_dims: int = 2, input_size=None, patch_size: int = 4,
        hidden_size: int = 96, mlp_dim: int = 192, num_layers: int = 4, num_heads: int = 4,
        dropout: float = 0.1, pos_embed_type: str = "learnable") -> nn.Module:
    """Vision transformer (MONAI ViT, CLS token, linear head); small by default (4 blocks of 96, 4 px patches)."""
    if input_size is None:
        raise ConfigError("model 'vit' needs the input size (its patch grid and position embedding depend on it)")
    size = tuple(int(s) for s in input_size)[-spatial_dims:]
    bad = [s for s in size if s % int(patch_size)]
    if bad:
        raise ConfigError(f"model 'vit': input size {list(size)} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ConfigError(f"model 'vit': hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    net = ViT(in_channels=in_channels, img_size=size, patch_size=int(patch_size), hidden_size=int(hidden_size),
              mlp_dim=int(mlp_dim), num_layers=int(num_layers), num_heads=int(num_heads), proj_type="conv",
              pos_embed_type=pos_embed_type, classification=True, num_classes=num_outputs,
              dropout_rate=float(dropout), spatial_dims=spatial_dims, save_attn=True,
              # no activation on the head; MONAI documents the argument as optional but leaves it unannotated
              post_activation=None)  # pyright: ignore[reportArgumentType]
    return ViTClassifier(net, tuple(s // int(patch_size) for s in size))
