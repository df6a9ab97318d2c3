"""How faithful is a map? Deletion/insertion curves against a random map, and a randomisation sanity check.

Deletion: pixels are replaced by the reference image (the image's mean intensity, the same
reference that integrated gradients, occlusion, LIME and KernelSHAP use) in order of decreasing
attribution; the class probability should fall fast (low area under the curve is good).
Insertion: pixels of the image are put into the reference in the same order; the probability
should rise fast (high area is good). A random map gives the baseline. The model-parameter randomisation check
(Adebayo et al. 2018) re-initialises the network: a faithful method's maps must change
(low Spearman rank correlation and SSIM between maps of the trained and the randomised model).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from medlens.explain.methods import TwoClass, reference


@torch.no_grad()
def deletion_insertion(net, x: torch.Tensor, maps: np.ndarray, target: np.ndarray, steps: int = 20,
                       batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-image deletion AUC and insertion AUC (trapezoid over the fraction of pixels changed)."""
    model = TwoClass(net).eval()
    n = len(x)
    flat = torch.from_numpy(maps.reshape(n, -1))
    order = torch.argsort(flat, dim=1, descending=True)
    npix = flat.shape[1]
    blurred = reference(x)
    fracs = np.linspace(0, 1, steps + 1)
    del_scores = np.zeros((n, steps + 1))
    ins_scores = np.zeros((n, steps + 1))
    tgt = torch.as_tensor(target).long()
    for si, f in enumerate(fracs):
        k = int(round(f * npix))
        mask = torch.zeros(n, npix)
        if k:
            mask.scatter_(1, order[:, :k], 1.0)
        mask = mask.view(n, 1, *x.shape[2:])
        deleted = x * (1 - mask) + blurred * mask
        inserted = blurred * (1 - mask) + x * mask
        for arr, out in ((deleted, del_scores), (inserted, ins_scores)):
            probs = torch.cat([torch.softmax(model(arr[i:i + batch]).float(), 1) for i in range(0, n, batch)])
            out[:, si] = probs.gather(1, tgt.view(-1, 1))[:, 0].numpy()
    return np.asarray(np.trapezoid(del_scores, fracs, axis=1)), np.asarray(np.trapezoid(ins_scores, fracs, axis=1))


def randomized_copy(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same architecture with every learnable layer re-initialised (normalisation buffers kept)."""
    torch.manual_seed(seed)
    rnd = copy.deepcopy(net)
    for m in rnd.modules():
        reset = getattr(m, "reset_parameters", None)
        if m is not rnd and reset is not None and any(True for _ in m.parameters(recurse=False)):
            reset()
    return rnd.eval()


def map_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean Spearman rank correlation and mean SSIM between two stacks of maps (N, *spatial)."""
    rs, ss = [], []
    for x, y in zip(a, b):
        x, y = x.astype(np.float64), y.astype(np.float64)
        # scipy's axis/NaN-policy decorator hides SignificanceResult from type checkers: hence the ignore
        r = spearmanr(x.ravel(), y.ravel()).statistic  # pyright: ignore[reportAttributeAccessIssue]
        rs.append(0.0 if not np.isfinite(r) else abs(r))
        nx = (x - x.min()) / (np.ptp(x) or 1.0)
        ny = (y - y.min()) / (np.ptp(y) or 1.0)
        win = min(7, *[s if s % 2 else s - 1 for s in x.shape])
        ss.append(structural_similarity(nx, ny, data_range=1.0, win_size=max(win, 3)))
    return float(np.mean(rs)), float(np.mean(ss))


def localisation(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Where ground truth exists: the pointing game (is each map's maximum inside its mask?) and the
    fraction of positive map energy inside the mask, averaged over images (maps and masks (N, *spatial))."""
    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ")
    hits, energy = [], []
    for m, k in zip(maps, masks):
        if not k.any():
            continue
        hits.append(bool(k.flat[int(np.argmax(m))]))
        pos = np.clip(m, 0, None)
        energy.append(float(pos[k].sum() / pos.sum()) if pos.sum() > 0 else 0.0)
    return {"n": len(hits), "pointing_game": float(np.mean(hits)) if hits else float("nan"),
            "energy_inside": float(np.mean(energy)) if energy else float("nan"),
            "mask_fraction": float(masks.mean())}
