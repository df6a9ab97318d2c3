"""Segmentation engine: losses, the Lightning module, sliding-window inference and post-processing.

Training draws random patches (``PatchSampler``) and validates by whole-image sliding-window inference
every ``segmentation.val_every`` epochs (``val_dice``). Inference blends overlapping windows with
Gaussian weights, optionally averages flips (test-time augmentation) and post-processes: threshold
(chosen on validation), N largest connected components, minimum component size.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlens.engine.module import ClassifierModule
from medlens.errors import ConfigError, MedlensWarning
from medlens.tasks import get_task


def make_loss(seg_cfg, n_outputs: int):
    """MONAI loss for ``segmentation.loss``; one output channel means sigmoid, more mean softmax."""
    from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss, TverskyLoss

    binary = n_outputs == 1
    act = dict(sigmoid=True) if binary else dict(softmax=True, to_onehot_y=True)
    name = seg_cfg.loss
    if name == "dice_ce":
        return DiceCELoss(**act, batch=True)
    if name == "dice_focal":
        return DiceFocalLoss(**act, batch=True)
    if name == "dice":
        return DiceLoss(**act, batch=True)
    if name == "tversky":
        return TverskyLoss(**act, alpha=seg_cfg.tversky_alpha, beta=seg_cfg.tversky_beta, batch=True)
    if name == "focal":
        return FocalLoss() if binary else FocalLoss(to_onehot_y=True, use_softmax=True)
    if name == "ce":
        if binary:
            return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float())
        return lambda logits, y: F.cross_entropy(logits, y[:, 0].long())
    raise ConfigError(f"unknown segmentation loss '{name}'")


def to_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) class probabilities (the segmentation task's activation); a single output channel becomes
    [1 - p, p]."""
    return get_task("segmentation").activation(logits)


@torch.no_grad()
def predict_probs(net: torch.nn.Module, image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                  overlap: float = 0.25, blend: str = "gaussian", sw_batch_size: int = 8, tta: bool = False,
                  name: str = "image") -> np.ndarray:
    """Class probabilities (K, *spatial) of one prepared image (C, *spatial) by sliding windows.

    An image smaller than the window is padded with zeros (warned) and the padding cropped off again.
    With ``tta`` the prediction is the mean over every combination of flips of the spatial axes (4 passes
    in 2D, 8 in 3D): the whole flip group, so the result is equivariant to flipping the input.
    """
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None]
    spatial = x.shape[2:]
    if len(patch_size) != len(spatial):
        raise ConfigError(f"patch size {list(patch_size)} does not fit a {len(spatial)}D image")
    if any(s < p for s, p in zip(spatial, patch_size)):
        warnings.warn(f"{name} {tuple(spatial)} is smaller than the patch {tuple(patch_size)}; padded with zeros",
                      MedlensWarning, stacklevel=2)
    was_training = net.training
    net.eval()

    def run(t: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(t, tuple(patch_size), sw_batch_size, lambda z: to_probs(net(z)),
                                        overlap=overlap, mode=blend, padding_mode="constant", cval=0.0)

    axes = range(2, x.ndim)
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if tta else [()]
    acc = None
    for f in flips:
        out = run(x.flip(f) if f else x)
        out = out.flip(f) if f else out
        acc = out if acc is None else acc + out
    net.train(was_training)
    return (acc / len(flips))[0].float().numpy()


def postprocess(probs: np.ndarray, threshold: float = 0.5, largest_components: int | None = None,
                min_size: int = 0) -> np.ndarray:
    """Label map (uint8) from probabilities (K, *spatial): threshold for two classes, argmax above;
    then per class keep the N largest connected components and drop those under ``min_size`` voxels."""
    from skimage.morphology import remove_small_objects

    from medlens.imaging.segment import largest_components as keep_largest

    labels = (probs[1] >= threshold).astype(np.uint8) if probs.shape[0] == 2 else probs.argmax(0).astype(np.uint8)
    if not largest_components and not min_size:
        return labels
    out = np.zeros_like(labels)
    for k in range(1, probs.shape[0]):
        m = labels == k
        if min_size > 1:
            m = remove_small_objects(m, max_size=min_size - 1)
        if largest_components:
            m = keep_largest(m, largest_components)
        out[m] = k
    return out


def augment_pair(augment, x: torch.Tensor, y: torch.Tensor, n_outputs: int, gen: torch.Generator):
    """Augment images (B, C, ...) and label maps (B, ...) together: the same geometry for both,
    intensity changes for the image only."""
    c = x.shape[1]
    if n_outputs == 1:  # binary: the mask as one channel, re-thresholded after interpolation
        z = augment.geometric(torch.cat([x, y[:, None].to(x.dtype)], 1), gen)
        y = (z[:, c] > 0.5).long()
    else:  # one channel per class; argmax on a channels-last copy (argmax over dim 1 is slow on CPU)
        onehot = F.one_hot(y.long(), n_outputs).movedim(-1, 1).to(x.dtype)
        z = augment.geometric(torch.cat([x, onehot], 1), gen)
        y = z[:, c:].movedim(1, -1).contiguous().argmax(-1)
    return augment.intensity(z[:, :c], gen), y


def foreground_dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> float:
    """Mean Dice over the foreground classes (MONAI's ``compute_dice``; both empty = 1), what training
    monitors as ``val_dice``."""
    from monai.metrics import compute_dice

    onehot = lambda a: F.one_hot(torch.as_tensor(a.astype(np.int64)), n_classes).movedim(-1, 0)[None]  # noqa: E731
    d = compute_dice(onehot(pred), onehot(ref), include_background=False, ignore_empty=False)
    return float(d.mean())


class SegmentationModule(ClassifierModule):
    """Patch training with a MONAI loss; whole-image sliding-window validation (``val_dice``)."""

    def __init__(self, model, train_cfg, seg_cfg, n_outputs: int, seed: int = 0, sampler=None) -> None:
        super().__init__(model, "segmentation", train_cfg.model_copy(update={"monitor": "val_dice"}), seed=seed)
        self.seg = seg_cfg
        self.n_outputs = n_outputs
        self.criterion = make_loss(seg_cfg, n_outputs)
        self.sampler = sampler
        self._dice: list[float] = []

    def on_train_epoch_start(self) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment.active:
            x, y = augment_pair(self.augment, x, y, self.n_outputs, self._gen)
        logits = self(x)
        loss = self.criterion(logits.float(), y[:, None])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        e = self.current_epoch
        if e and (e + 1) % self.seg.val_every and e + 1 != self.trainer.max_epochs:
            return  # validate after the first epoch, every val_every epochs and after the last
        x, y = batch
        probs = predict_probs(self.model, x[0], self.seg.patch_size, self.seg.overlap, self.seg.blend,
                              self.seg.sw_batch_size)
        self._dice.append(foreground_dice(postprocess(probs), y[0].numpy(), probs.shape[0]))

    def on_validation_epoch_end(self) -> None:
        if self._dice:
            self.log("val_dice", float(np.mean(self._dice)))
            self._dice.clear()
        elif "val_dice" in self.trainer.callback_metrics:  # keep the last value between validations
            self.log("val_dice", float(self.trainer.callback_metrics["val_dice"]))


class WholeImages(torch.utils.data.Dataset):
    """Validation: one full prepared image and its mask per item."""

    def __init__(self, cases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        c = self.cases[i]
        return torch.from_numpy(c.image), torch.from_numpy(c.mask.astype(np.int64))

