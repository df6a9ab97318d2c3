"""Self-supervised pretraining of a registered classifier's backbone: SimCLR or masked image modelling.

Fitting only: the caller (``medlens.workflow.pretrain``) pools the unlabelled images and writes the result.

- **SimCLR** (Chen et al. 2020): two views of each image from the seeded ``BatchAugment`` (strong geometry
  and intensity) plus a random crop-and-resize and random erasing of this module; the backbone's pooled
  features (the input of the model's last ``Linear``) go through a 2-layer projection head; NT-Xent loss.
- **MAE** for CNNs, in the spirit of SimMIM (Xie et al. 2022): random square patches (``mask_ratio`` of them)
  of the normalised input are set to 0 (the dataset mean); a light decoder (1x1 conv, upsampling to the input
  size, 3x3 conv) reconstructs the pixels from the backbone's last spatial feature map; the loss is the mean
  squared error over the masked pixels only.

The backbone is everything of the registered model except its last ``Linear`` module (the classification
head); its state dict keeps the model's own names, so ``models.transfer.apply_transfer`` loads it.
Randomness is seeded as in ``engine.module``: data order from ``(seed, epoch)``, augmentation, masks and
dropout from ``(seed, global step)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from medlens.config import AugmentConfig
from medlens.errors import ConfigError
from medlens.transforms.augment import BatchAugment

METHODS = ("simclr", "mae")

# SimCLR's augmentation strength for small medical images (BatchAugment's own transforms); crop and erasing
# are added below.
SIMCLR_AUGMENT = AugmentConfig(hflip=0.5, vflip=0.0, dflip=0.0, rotate=20, translate=0.1, scale=0.25, shear=10,
                               brightness=0.4, contrast=0.4, noise=0.1)


def head_name(net: nn.Module) -> str:
    """The name of the model's classification head: its last ``Linear`` module."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"model {type(net).__name__} has no Linear classification head to pretrain a "
                          "backbone for (pretraining needs a classifier such as small_cnn or resnet18)")
    return linears[-1]


def backbone_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its head (the last ``Linear``), names unchanged, tensors detached."""
    head = head_name(net) + "."
    return {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith(head)}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of two views' embeddings, both (N, D).

    For each of the 2N embeddings the positive is the other view of the same image and the negatives are the
    other 2N - 2; the loss is the mean over all 2N anchors of
    ``-log(exp(s_pos / t) / sum_{k != anchor} exp(s_k / t))`` with cosine similarities ``s``.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(f"nt_xent needs two (N>=2, D) embeddings of one shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def patch_mask(shape: tuple[int, ...], patch: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A (B, 1, *spatial) float mask, 1 on masked pixels: per sample, ``round(ratio x n_patches)`` of the
    ``patch``-sized squares (cubes in 3D) chosen at random; a partial edge patch belongs to its neighbour."""
    b, spatial = shape[0], tuple(shape[2:])
    grid = tuple(max(1, s // patch) for s in spatial)
    n = math.prod(grid)
    k = min(n, max(1, int(round(ratio * n))))
    order = torch.rand(b, n, generator=generator).argsort(dim=1)
    m = torch.zeros(b, n)
    m.scatter_(1, order[:, :k], 1.0)
    m = m.view(b, 1, *grid)
    return F.interpolate(m, size=spatial, mode="nearest")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (``mask`` 1 there, broadcast over channels)."""
    mask = mask.expand_as(target).float()
    return ((pred.float() - target.float()) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)


def random_resized_crop(x: torch.Tensor, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample, a random box of ``min_area``..1 of the image (aspect 3/4..4/3), resized back (bilinear /
    trilinear): SimCLR's crop, as one ``affine_grid``/``grid_sample`` call for the batch."""
    b, nd = x.shape[0], x.ndim - 2
    area = min_area + (1 - min_area) * torch.rand(b, generator=generator)
    log_r = (torch.rand(b, generator=generator) * 2 - 1) * math.log(4 / 3)
    side = area ** (1 / nd)
    scales = [side * torch.exp(log_r / 2), side * torch.exp(-log_r / 2)] + [side] * (nd - 2)
    scales = [s.clamp(max=1.0) for s in scales]
    theta = torch.zeros(b, nd, nd + 1)
    for i, s in enumerate(scales):  # axis i of affine_grid is x, y(, z)
        theta[:, i, i] = s
        theta[:, i, nd] = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability ``p`` per sample, one random box of 5-20% of the image set to the sample's mean."""
    b, spatial = x.shape[0], x.shape[2:]
    on = torch.rand(b, generator=generator) < p
    frac = (0.05 + 0.15 * torch.rand(b, generator=generator)) ** (1 / len(spatial))
    keep = torch.ones_like(x[:, :1])
    for i in range(b):
        if not on[i]:
            continue
        sl = []
        for s in spatial:
            w = max(1, int(round(float(frac[i]) * s)))
            start = int(torch.randint(0, s - w + 1, (1,), generator=generator))
            sl.append(slice(start, start + w))
        keep[(i, 0, *sl)] = 0
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return x * keep + mean * (1 - keep)


class _Tap:
    """Forward hooks that keep the input of the head and the last spatial feature map of a forward pass."""

    def __init__(self, net: nn.Module, head: str, spatial_dims: int) -> None:
        self.pooled: torch.Tensor | None = None
        self.fmap: torch.Tensor | None = None
        self.nd = spatial_dims
        modules = dict(net.named_modules())
        self.handles = [modules[head].register_forward_hook(self._head)]
        # A model's declared spatial layer (``cam_target``, e.g. the ViT's patch-token grid) is the feature map;
        # otherwise the last leaf module's spatial output (a CNN's last activation before pooling). A
        # transformer's attention matrices would look spatial too: declaring the layer avoids them.
        marked = [m for m in modules.values() if getattr(m, "cam_target", False)]
        taps = marked[-1:] or [m for name, m in modules.items() if name and not list(m.children()) and name != head]
        for m in taps:
            self.handles.append(m.register_forward_hook(self._leaf))

    def _head(self, module, inputs, output) -> None:
        self.pooled = inputs[0]

    def _leaf(self, module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == self.nd + 2 and math.prod(output.shape[2:]) > 1:
            self.fmap = output

    def reset(self) -> None:
        self.pooled = self.fmap = None


class _Decoder(nn.Module):
    """MAE/SimMIM decoder for a CNN feature map: 1x1 conv, upsample to the input size, 3x3 conv."""

    def __init__(self, c_in: int, out_channels: int, spatial_dims: int, hidden: int = 64) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.reduce = nn.Sequential(conv(c_in, hidden, 1), nn.GELU())
        self.out = conv(hidden, out_channels, 3, padding=1)

    def forward(self, f: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        h = F.interpolate(self.reduce(f), size=size, mode=self.mode, align_corners=False)
        return self.out(h)


@dataclass
class PretrainResult:
    backbone: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0
    n_steps: int = 0
    head: str = ""


def pretrain_backbone(net: nn.Module, images: torch.Tensor, method: str, *, mean, std, epochs: int = 10,
                      batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                      temperature: float = 0.2, mask_ratio: float = 0.6, patch: int = 4,
                      augment: AugmentConfig | None = None, bf16: bool = True,
                      progress: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Pretrain ``net`` (a registered classifier; its head is not used) on ``images`` (N, C, *spatial),
    uint8 or float in [0, 1], without labels. Returns the backbone's state dict and the loss per epoch.

    ``mean``/``std`` (per channel) normalise the input as ``engine.module.Normalize`` does in training.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown pretraining method '{method}'; choose one of {list(METHODS)}")
    if len(images) < 2:
        raise ConfigError(f"pretraining needs at least 2 images, got {len(images)}")
    if not 0 < temperature <= 10:
        raise ConfigError(f"temperature must be in (0, 10], got {temperature}")
    if not 0 < mask_ratio < 1:
        raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    nd = images.ndim - 2
    head = head_name(net)
    tap = _Tap(net, head, nd)
    torch.manual_seed(seed)
    shape = (1, -1) + (1,) * nd
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6).view(shape)
    with torch.no_grad():  # probe the feature shapes
        net.eval()
        net(((images[:2].float() / (255.0 if images.dtype == torch.uint8 else 1.0)) - mean_t) / std_t)
    if tap.pooled is None:
        raise ConfigError(f"model {type(net).__name__}: its head '{head}' is not used in the forward pass")
    extra: nn.Module
    if method == "simclr":
        d = tap.pooled.shape[1]
        extra = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, 64))
        bsz = max(2, batch_size // 2)  # two views per image: the network sees batch_size inputs per step
    else:
        if tap.fmap is None:
            raise ConfigError(f"model {type(net).__name__} has no spatial feature map for masked image "
                              "modelling; use --method simclr")
        extra = _Decoder(tap.fmap.shape[1], images.shape[1], nd)
        bsz = batch_size
    aug = BatchAugment(augment if augment is not None else SIMCLR_AUGMENT)
    # The head takes no part (SimCLR uses its input, MAE a feature map): leave it out of the optimiser.
    head_params = {id(p) for p in dict(net.named_modules())[head].parameters()}
    params = [p for p in net.parameters() if id(p) not in head_params] + list(extra.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(images)
    steps_per_epoch = max(1, n // bsz)  # drop the last partial batch (NT-Xent wants full batches)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    gen, order_gen = torch.Generator(), torch.Generator()
    result = PretrainResult(backbone={}, head=head)
    t0, step = time.perf_counter(), 0
    net.train()
    extra.train()
    try:
        for epoch in range(epochs):
            order_gen.manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=order_gen)
            total_loss = 0.0
            for b in range(steps_per_epoch):
                step_seed = seed * 1_000_003 + step
                torch.manual_seed(step_seed)
                gen.manual_seed(step_seed + 7)
                x = images[perm[b * bsz:(b + 1) * bsz]]
                x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                if method == "simclr":  # the views are made in float32, outside autocast
                    views = []
                    for _ in range(2):
                        v = random_resized_crop(x, 0.4, gen)
                        v = random_erase(aug(v, gen), 0.25, gen)
                        views.append((v - mean_t) / std_t)
                    inputs = torch.cat(views)
                else:
                    target = (x - mean_t) / std_t
                    mask = patch_mask(tuple(x.shape), patch, mask_ratio, gen)
                    inputs = target * (1 - mask)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    tap.reset()
                    net(inputs)
                    if method == "simclr":
                        z = extra(tap.pooled.flatten(1))
                        loss = nt_xent(z[:len(x)], z[len(x):], temperature)
                    else:
                        pred = extra(tap.fmap, tuple(x.shape[2:]))
                        loss = masked_mse(pred, target, mask)
                opt.zero_grad(set_to_none=True)
                loss.float().backward()
                opt.step()
                sched.step()
                total_loss += float(loss.detach())
                step += 1
            result.losses.append(total_loss / steps_per_epoch)
            if progress is not None:
                progress(epoch + 1, result.losses[-1])
    finally:
        for h in tap.handles:
            h.remove()
    net.eval()
    result.backbone = backbone_state(net)
    result.seconds = time.perf_counter() - t0
    result.n_steps = step
    return result
