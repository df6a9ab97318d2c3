"""Attribution methods, one registry for 2D and 3D models (captum and MONAI's visualize underneath).

Every method takes the run's network (normalisation included), a batch ``x`` of inputs in [0, 1]
(N, C, *spatial), target class indices and returns maps of shape (N, *spatial), float32. ``explain``
refuses maps with NaN or infinite values (``NonFiniteMapError``) rather than zeroing them, so a method
that fails numerically is never shown as a blank "nothing matters" map.
Binary models (one logit) are wrapped so class 1 scores ``+z/2`` and class 0 ``-z/2``; the
softmax of that pair is exactly the sigmoid, and either class can be explained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum._utils.models.linear_model import SkLearnLasso
from captum.attr import IntegratedGradients, KernelShap, LayerGradCam, Lime, NoiseTunnel, Occlusion, Saliency
from monai.networks.blocks.selfattention import SABlock
from monai.visualize import GradCAMpp
from skimage.segmentation import slic

from medlens.errors import ConfigError, MedlensError
from medlens.explain.layers import find_target_layer
from medlens.models.vit import ViTClassifier


class NonFiniteMapError(MedlensError):
    """An attribution method produced NaN or infinite values."""


def check_finite(maps: torch.Tensor, method: str) -> torch.Tensor:
    """``maps`` unchanged if every value is finite; else ``NonFiniteMapError`` naming the samples."""
    bad = ~torch.isfinite(maps)
    if bad.any():
        per_sample = bad.flatten(1).sum(1)
        samples = torch.nonzero(per_sample).flatten().tolist()
        raise NonFiniteMapError(f"method '{method}' gave {int(bad.sum())} non-finite value(s) (NaN or inf) in the "
                                f"maps of sample(s) {samples[:10]}; the model's gradients or outputs are not finite "
                                "there")
    return maps


class TwoClass(nn.Module):
    """(N, 1) binary logit -> (N, 2) scores whose softmax equals (1 - sigmoid, sigmoid)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return torch.cat([-z / 2, z / 2], dim=1) if z.shape[1] == 1 else z


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    dims: tuple[int, ...]
    uses_layer: bool
    summary: str
    attention: bool = False   # needs a transformer (self-attention blocks): ViT only


METHODS: dict[str, Method] = {}


def _register(name, dims=(2, 3), uses_layer=False, attention=False):
    def deco(fn):
        METHODS[name] = Method(name, fn, dims, uses_layer, (fn.__doc__ or "").strip().splitlines()[0], attention)
        return fn

    return deco


def list_methods() -> list[Method]:
    return list(METHODS.values())


def _upsample(cam: torch.Tensor, size) -> torch.Tensor:
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(cam, size=tuple(size), mode=mode, align_corners=False)


def _activations_and_grads(model, layer, x, target):
    acts, grads = {}, {}
    h1 = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: grads.__setitem__("g", go[0]))
    try:
        x = x.clone().requires_grad_(True)
        out = model(x)
        model.zero_grad()
        out.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    return acts["a"].detach(), grads["g"].detach(), out.detach()


@_register("gradcam", uses_layer=True)
def gradcam(model, x, target, layer, layer_name, **kw):
    """Grad-CAM (captum LayerGradCam): channel weights = spatially averaged gradients, ReLU."""
    # captum types attribute() for tuple inputs too; one tensor in gives one tensor out
    attr = cast(torch.Tensor, LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True))
    return _upsample(attr.detach(), x.shape[2:])[:, 0]


@_register("gradcam++", uses_layer=True)
def gradcampp(model, x, target, layer, layer_name, **kw):
    """Grad-CAM++ (MONAI visualize.GradCAMpp): higher-order weighting of positive gradients."""
    cam = GradCAMpp(model, target_layers=layer_name, postprocessing=lambda t: t)
    out = [cam(x[i:i + 1], class_idx=int(target[i])) for i in range(len(x))]
    return torch.cat(out).detach()[:, 0]


@_register("layercam", uses_layer=True)
def layercam(model, x, target, layer, layer_name, **kw):
    """LayerCAM: element-wise ReLU(gradient) x activation, summed over channels (layer-wise CAM variant)."""
    a, g, _ = _activations_and_grads(model, layer, x, target)
    cam = F.relu((F.relu(g) * a).sum(1, keepdim=True))
    return _upsample(cam, x.shape[2:])[:, 0]


@_register("cam", uses_layer=True)
def cam(model, x, target, layer, layer_name, **kw):
    """CAM: final linear weights of the class x last feature maps (needs global-pool + linear head)."""
    if attention_blocks(model):
        raise ConfigError("CAM needs a global-average-pooled linear head; a ViT classifies from its CLS token, "
                          "use gradcam or attention_rollout / attention_gradcam")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    a = acts["a"]
    if not linears or linears[-1].in_features != a.shape[1]:
        raise ConfigError("CAM needs a global-average-pooled linear head on the chosen layer; this model has a "
                          "dense head, use gradcam")
    w = linears[-1].weight.detach()
    if w.shape[0] == 1:  # binary: class 1 = +w/2, class 0 = -w/2
        w = torch.cat([-w / 2, w / 2])
    weights = w[target]  # (N, C)
    shape = (len(x), -1) + (1,) * (a.ndim - 2)
    cam_ = F.relu((weights.view(shape) * a).sum(1, keepdim=True))
    return _upsample(cam_, x.shape[2:])[:, 0]


@_register("saliency")
def saliency(model, x, target, **kw):
    """Vanilla gradient saliency (captum Saliency), signed: d score / d input summed over channels.

    Signed, because for a one-logit binary model |gradient| is the same for both classes; the sign
    says which class a pixel's increase would favour.
    """
    return Saliency(model).attribute(x, target=target, abs=False).detach().sum(1)


@_register("smoothgrad")
def smoothgrad(model, x, target, n_samples: int = 16, **kw):
    """SmoothGrad (captum NoiseTunnel over Saliency): signed gradients averaged over noisy copies."""
    nt = NoiseTunnel(Saliency(model))
    sd = float(0.15 * (x.max() - x.min()))
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same noise every call: reproducible maps
    try:
        out = cast(torch.Tensor, nt.attribute(x, nt_type="smoothgrad", nt_samples=n_samples, stdevs=sd,
                                               target=target, abs=False))   # one tensor in, one out (as above)
    finally:
        torch.random.set_rng_state(state)
    return out.detach().sum(1)


def reference(x: torch.Tensor) -> torch.Tensor:
    """The 'absent information' image used by every perturbation method and by the faithfulness
    metric: each image's own mean intensity, constant over the image."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x).contiguous()


@_register("integrated_gradients")
def integrated_gradients(model, x, target, n_steps: int = 32, **kw):
    """Integrated gradients (captum) from the mean-intensity reference; signed, summed over channels."""
    out = IntegratedGradients(model).attribute(x, baselines=reference(x), target=target, n_steps=n_steps,
                                               internal_batch_size=max(len(x) * 8, 64))
    return out.detach().sum(1)


@_register("occlusion")
def occlusion(model, x, target, **kw):
    """Occlusion sensitivity (captum Occlusion): score drop when a patch is replaced by the image mean."""
    spatial = x.shape[2:]
    win = tuple(max(2, s // 7) for s in spatial)
    stride = tuple(max(1, w // 2) for w in win)
    base = reference(x)
    out = Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1],) + win, strides=(x.shape[1],) + stride,
                                     target=target, baselines=base, perturbations_per_eval=64)
    return out.detach().sum(1)


def superpixels(img: np.ndarray, n_segments: int) -> np.ndarray:
    """SLIC superpixels (scikit-image) of one image (C, *spatial) in [0, 1]; 3D gives supervoxels."""
    arr = np.moveaxis(img, 0, -1)
    return slic(arr.astype(np.float64), n_segments=n_segments, compactness=0.1, start_label=0,
                channel_axis=-1, enforce_connectivity=False)


def _feature_mask(x: torch.Tensor, n_segments: int) -> torch.Tensor:
    masks = [superpixels(x[i].numpy(), n_segments) for i in range(len(x))]
    m = torch.from_numpy(np.stack(masks)).long()
    return m.unsqueeze(1).expand_as(x).contiguous()


def _perturbation(cls, model, x, target, n_samples, n_segments, **init):
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1]
        mask = _feature_mask(xi, n_segments)
        base = reference(xi)
        attr = cls(model, **init).attribute(xi, target=target[i:i + 1], feature_mask=mask, n_samples=n_samples,
                                            baselines=base, perturbations_per_eval=64)
        out.append(attr.detach()[:, 0])
    return torch.cat(out)


@_register("lime")
def lime(model, x, target, n_samples: int = 200, n_segments: int = 40, **kw):
    """LIME on SLIC superpixels (captum Lime, Lasso surrogate): superpixel weights painted back."""
    return _perturbation(Lime, model, x, target, n_samples, n_segments, interpretable_model=SkLearnLasso(alpha=1e-4))


@_register("kernelshap")
def kernelshap(model, x, target, n_samples: int = 200, n_segments: int = 40, **kw):
    """KernelSHAP on SLIC superpixels (captum KernelShap): Shapley values of superpixels."""
    return _perturbation(KernelShap, model, x, target, n_samples, n_segments)


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The self-attention blocks (MONAI ``SABlock``) of a model, in order; empty for convolutional models."""
    return [m for m in model.modules() if isinstance(m, SABlock)]


def applicable(method: str, net: nn.Module) -> bool:
    """Whether ``method`` can explain ``net``: attention methods need self-attention blocks, and CAM a
    pooled linear head, which a ViT (CLS token) does not have."""
    has_attention = bool(attention_blocks(net))
    return has_attention if METHODS[method].attention else not (method == "cam" and has_attention)


def _token_grid(model: nn.Module, method: str) -> tuple[list[nn.Module], tuple[int, ...]]:
    blocks = attention_blocks(model)
    vits = [m for m in model.modules() if isinstance(m, ViTClassifier)]
    if not blocks or not vits:
        raise ConfigError(f"method '{method}' needs a transformer model (model: vit); this model has no "
                          "self-attention layers, use gradcam")
    return blocks, vits[0].grid


def _attention_maps(model, x, target, blocks, need_grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's attention (N, heads, T, T) on ``x`` and, when ``need_grad``, its gradient w.r.t. the
    target score. MONAI's ``save_attn`` keeps a detached copy (``SABlock.att_mat``); the gradient needs the
    live tensor, taken by a hook on the attention dropout (identity in eval mode), whose input it is. Without
    ``need_grad`` the gradients are an empty list."""
    atts = []
    hooks = [b.drop_weights.register_forward_hook(lambda m, i, o: atts.append(i[0])) for b in blocks]
    try:
        with torch.set_grad_enabled(need_grad):
            out = model(x)
            if need_grad:
                for a in atts:
                    a.retain_grad()
                model.zero_grad()
                out.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    if len(atts) != len(blocks):
        raise MedlensError(f"expected {len(blocks)} attention maps, the forward pass gave {len(atts)}")
    grads: list[torch.Tensor] = []
    for a in atts if need_grad else []:
        if a.grad is None:
            raise MedlensError("the target score does not depend on the attention maps; no gradient to weight them")
        grads.append(a.grad)
    return [a.detach() for a in atts], grads


def _tokens_to_map(cls_row: torch.Tensor, grid: tuple[int, ...], size) -> torch.Tensor:
    """CLS-to-patch relevance (N, T-1) -> map (N, *size), upsampled from the patch grid."""
    cam = cls_row.reshape((len(cls_row), 1) + tuple(grid))
    return _upsample(cam.float(), size)[:, 0]


@_register("attention_rollout", attention=True)
def attention_rollout(model, x, target, **kw):
    """Attention rollout (Abnar & Zuidema 2020): head-averaged attention + identity, multiplied over blocks (ViT).

    Class-agnostic: rollout follows how information flows to the CLS token, whatever the class; the
    target is ignored.
    """
    blocks, grid = _token_grid(model, "attention_rollout")
    atts, _ = _attention_maps(model, x, target, blocks, need_grad=False)
    n, t = atts[0].shape[0], atts[0].shape[-1]
    eye = torch.eye(t).expand(n, t, t)
    rollout = eye
    for a in atts:
        a = 0.5 * a.mean(1) + 0.5 * eye           # residual connection: half the signal skips attention
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return _tokens_to_map(rollout[:, 0, 1:], grid, x.shape[2:])


@_register("attention_gradcam", attention=True)
def attention_gradcam(model, x, target, **kw):
    """Gradient-weighted attention (Chefer et al. 2021): rollout of head-averaged ReLU(grad x attention) (ViT).

    Grad-CAM's idea on attention: each block's attention is weighted by the gradient of the target class
    score with respect to it, positive parts kept, averaged over heads, and accumulated over blocks with the
    residual (R <- R + A R, R starting at the identity). Class-specific.
    """
    blocks, grid = _token_grid(model, "attention_gradcam")
    atts, grads = _attention_maps(model, x, target, blocks, need_grad=True)
    n, t = atts[0].shape[0], atts[0].shape[-1]
    rel = torch.eye(t).expand(n, t, t).clone()
    for a, g in zip(atts, grads):
        cam = F.relu(g * a).mean(1)
        rel = rel + cam @ rel
    return _tokens_to_map(rel[:, 0, 1:], grid, x.shape[2:])


def explain(net: nn.Module, x: torch.Tensor, method: str, target=None, layer: str | None = None,
            **kwargs) -> tuple[np.ndarray, dict]:
    """Attribution maps for a batch.

    Args:
        net: the run's network (``ClassifierNet``), in eval mode.
        x: (N, C, *spatial) inputs in [0, 1].
        method: a name from ``METHODS`` (see ``medlens explain --list``).
        target: class index (int or per-sample sequence); default: the predicted class.
        layer: module name for CAM-family methods; default: the last spatial block.

    Returns:
        maps (N, *spatial) float32, and info (method, layer, targets, probabilities, seconds).

    Raises:
        NonFiniteMapError: the method gave NaN or infinite values.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    m = METHODS[method]
    nd = x.ndim - 2
    if nd not in m.dims:
        raise ConfigError(f"method '{method}' does not support {nd}D inputs")
    model = TwoClass(net).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), 1)
    if target is None:
        tgt = probs.argmax(1)
    else:
        tgt = torch.as_tensor(np.broadcast_to(np.asarray(target), (len(x),)).copy()).long()
        if int(tgt.max()) >= probs.shape[1] or int(tgt.min()) < 0:
            raise ConfigError(f"target class {target} out of range: the model has {probs.shape[1]} classes")
    name, mod = (None, None)
    if m.uses_layer:
        full = None if layer is None else "net.net." + layer.removeprefix("net.net.").removeprefix("net.")
        name, mod = find_target_layer(model, x[:1], full, strip="net.net.")
        name = name.removeprefix("net.net.")
    t0 = time.perf_counter()
    maps = m.fn(model, x.float(), tgt, layer=mod, layer_name=None if name is None else "net.net." + name, **kwargs)
    secs = time.perf_counter() - t0
    maps = check_finite(maps.detach().float(), method).numpy().astype(np.float32)
    info = {"method": method, "layer": name, "targets": tgt.tolist(),
            "probabilities": probs.gather(1, tgt.view(-1, 1))[:, 0].tolist(), "seconds": secs}
    return maps, info
