"""Segmentation engine: losses and the Lightning module.

Training draws random patches (``PatchSampler``) and validates by whole-image sliding-window inference
every ``segmentation.val_every`` epochs (``val_dice``), with the inference of ``engine.inference`` (re-exported
here: ``to_probs``, ``predict_probs``, ``postprocess``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss, TverskyLoss
from monai.metrics import compute_dice

from medlens.engine.inference import postprocess, predict_probs, to_probs
from medlens.engine.module import ClassifierModule
from medlens.errors import ConfigError

__all__ = ["SegmentationModule", "WholeImages", "augment_pair", "foreground_dice", "make_loss", "postprocess",
           "predict_probs", "to_probs"]


def make_loss(seg_cfg, n_outputs: int):
    """MONAI loss for ``segmentation.loss``; one output channel means sigmoid, more mean softmax."""
    binary = n_outputs == 1
    multi = not binary   # softmax over one-hot targets; one channel: sigmoid
    name = seg_cfg.loss
    if name == "dice_ce":
        return DiceCELoss(sigmoid=binary, softmax=multi, to_onehot_y=multi, batch=True)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=binary, softmax=multi, to_onehot_y=multi, batch=True)
    if name == "dice":
        return DiceLoss(sigmoid=binary, softmax=multi, to_onehot_y=multi, batch=True)
    if name == "tversky":
        return TverskyLoss(sigmoid=binary, softmax=multi, to_onehot_y=multi, alpha=seg_cfg.tversky_alpha,
                           beta=seg_cfg.tversky_beta, batch=True)
    if name == "focal":
        return FocalLoss() if binary else FocalLoss(to_onehot_y=True, use_softmax=True)
    if name == "ce":
        if binary:
            return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float())
        return lambda logits, y: F.cross_entropy(logits, y[:, 0].long())
    raise ConfigError(f"unknown segmentation loss '{name}'")


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

