"""Segmentation inference: sliding windows with Gaussian blending, flip test-time augmentation, post-processing.

Inference blends overlapping windows with Gaussian weights, optionally averages flips (test-time augmentation)
and post-processes: threshold (chosen on validation), N largest connected components, minimum component size.
``run.Predictor`` segments through these functions and the training module (``engine.segmentation``) validates
with them; they need no training stack.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Sequence, cast

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from skimage.morphology import remove_small_objects

from medlens.errors import ConfigError, MedlensWarning
from medlens.imaging.segment import largest_components as keep_largest
from medlens.tasks import get_task


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
        # MONAI types the result for any predictor output; ours returns one tensor, so the result is one
        return cast(torch.Tensor, sliding_window_inference(
            t, tuple(patch_size), sw_batch_size, lambda z: to_probs(net(z)), overlap=overlap, mode=blend,
            padding_mode="constant", cval=0.0))

    axes = range(2, x.ndim)
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if tta else [()]
    acc: torch.Tensor | None = None
    for f in flips:
        out = run(x.flip(f) if f else x)
        out = out.flip(f) if f else out
        acc = out if acc is None else acc + out
    net.train(was_training)
    assert acc is not None  # flips holds at least the identity
    return (acc / len(flips))[0].float().numpy()


def postprocess(probs: np.ndarray, threshold: float = 0.5, largest_components: int | None = None,
                min_size: int = 0) -> np.ndarray:
    """Label map (uint8) from probabilities (K, *spatial): threshold for two classes, argmax above;
    then per class keep the N largest connected components and drop those under ``min_size`` voxels."""
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
