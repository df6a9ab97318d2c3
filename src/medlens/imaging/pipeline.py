"""``medlens process``: a named-step pipeline, from a string ("window:lung,denoise:nlm") or YAML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from medlens.safe_yaml import safe_load_yaml
from medlens.errors import ConfigError
from medlens.imaging import denoise, enhance, filters, segment
from medlens.io import resample
from medlens.io.image import Image
from medlens.io.windows import apply_window

# the argument each step takes: (cast, lowest value, lowest excluded?, what it is); None: no argument
_NUMERIC_ARGS: dict[str, tuple[type, float, bool, str]] = {
    "clahe": (float, 0.0, True, "clip limit"),
    "unsharp": (float, 0.0, False, "amount"),
    "gaussian": (float, 0.0, True, "sigma (voxels)"),
    "median": (int, 1, False, "size (voxels)"),
    "bilateral": (float, 0.0, True, "spatial sigma"),
    "diffusion": (int, 1, False, "iterations"),
    "lowpass": (float, 0.0, True, "cutoff (fraction of Nyquist)"),
    "highpass": (float, 0.0, True, "cutoff (fraction of Nyquist)"),
    "resample": (float, 0.0, True, "spacing (mm)"),
}
_NO_ARG = ("stretch", "equalize", "otsu", "lungs")
_DENOISERS = ("nlm", "wavelet", "bayes", "visushrink", "tv", "median")


def _number(name: str, arg: str):
    """The step's numeric argument, refused in one line when it is not a finite number in range."""
    cast, low, exclusive, what = _NUMERIC_ARGS[name]
    bound = f"> {low:g}" if exclusive else f">= {low:g}"
    try:
        value = cast(arg)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (exclusive and value == low):
        kind = "a whole number" if cast is int else "a finite number"
        raise ConfigError(f"step '{name}:{arg}': the {what} must be {kind} {bound}")
    return value


def _check_arg(name: str, arg: str | None) -> None:
    """Validate a step's argument before any image is read."""
    if arg is None:
        return
    if name in _NUMERIC_ARGS:
        _number(name, arg)
    elif name in _NO_ARG:
        raise ConfigError(f"step '{name}' takes no argument, got '{name}:{arg}'")
    elif name == "denoise" and arg not in _DENOISERS:
        raise ConfigError(f"unknown denoiser '{arg}'; expected one of {list(_DENOISERS)}")
    elif name == "window":
        apply_window(np.zeros(1, np.float32), arg.replace("/", ","))  # raises ConfigError for a bad window


def _steps() -> dict[str, tuple[Callable[[Image, str | None], Image], str]]:
    def as_img(img, arr):
        return img.with_array(np.asarray(arr))

    def num(name, arg, default):
        return default if arg is None else _number(name, arg)

    den = {"nlm": denoise.nlm, "wavelet": denoise.wavelet, "bayes": denoise.wavelet,
           "visushrink": lambda x: denoise.wavelet(x, method="VisuShrink"), "tv": denoise.total_variation,
           "median": denoise.median}

    def denoise_step(img, arg):
        key = arg or "nlm"
        if key not in den:
            raise ConfigError(f"unknown denoiser '{key}'; expected one of {list(den)}")
        return den[key](img)

    return {
        "window": (lambda img, a: enhance.window(img, (a or "lung").replace("/", ",")), "window:lung or window:40/400"),
        "stretch": (lambda img, a: enhance.contrast_stretch(img), "percentile contrast stretch"),
        "equalize": (lambda img, a: enhance.equalize(img), "histogram equalisation"),
        "clahe": (lambda img, a: enhance.clahe(img, num("clahe", a, 2.0)), "CLAHE (clip limit)"),
        "unsharp": (lambda img, a: enhance.unsharp(img, amount=num("unsharp", a, 1.0)), "unsharp masking (amount)"),
        "gaussian": (lambda img, a: filters.gaussian(img, num("gaussian", a, 1.0)), "Gaussian (sigma, voxels)"),
        "median": (lambda img, a: filters.median(img, num("median", a, 3)), "median (size)"),
        "bilateral": (lambda img, a: filters.bilateral(img, num("bilateral", a, 2.0)), "bilateral (spatial sigma)"),
        "diffusion": (lambda img, a: filters.anisotropic_diffusion(img, num("diffusion", a, 10)),
                      "anisotropic diffusion (iterations)"),
        "lowpass": (lambda img, a: filters.fft_filter(img, "lowpass", num("lowpass", a, 0.1)), "FFT low-pass (cutoff)"),
        "highpass": (lambda img, a: filters.fft_filter(img, "highpass", num("highpass", a, 0.1)),
                     "FFT high-pass (cutoff)"),
        "denoise": (denoise_step, "denoise:nlm|wavelet|visushrink|tv|median"),
        "otsu": (lambda img, a: as_img(img, segment.otsu(img).astype(np.uint8)), "Otsu mask"),
        "lungs": (lambda img, a: as_img(img, segment.lung_mask(img).astype(np.uint8)), "CT lung-field mask"),
        "resample": (lambda img, a: resample(img, num("resample", a, 1.0)), "isotropic resample (mm)"),
    }


def parse_steps(spec: str | list) -> list[tuple[str, str | None]]:
    """``"window:lung,denoise:nlm"`` or a list of ``{name: arg}`` / ``"name:arg"`` items (YAML)."""
    items = spec if isinstance(spec, list) else [s for s in str(spec).split(",") if s.strip()]
    steps = []
    known = _steps()
    for it in items:
        if isinstance(it, dict):
            (name, arg), = it.items()
            arg = None if arg is None else str(arg)
        else:
            name, _, arg = str(it).strip().partition(":")
            arg = arg or None
        if name not in known:
            raise ConfigError(f"unknown step '{name}'; available: {', '.join(known)}")
        _check_arg(name, arg)
        steps.append((name, arg))
    if not steps:
        raise ConfigError("no processing steps given")
    return steps


def load_steps(path_or_spec: str) -> list[tuple[str, str | None]]:
    p = Path(path_or_spec)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError("pipeline file not found", p)
        d = safe_load_yaml(p.read_text(), p)
        d = d.get("steps", d) if isinstance(d, dict) else d
        if not isinstance(d, list) or not all(isinstance(it, str) or (isinstance(it, dict) and len(it) == 1)
                                              for it in d):
            raise ConfigError("a pipeline file lists steps as 'name:arg' strings or one-key {name: arg} maps", p)
        return parse_steps(d)
    return parse_steps(path_or_spec)


def run_steps(image: Image, steps: list[tuple[str, str | None]]) -> Image:
    known = _steps()
    for name, arg in steps:
        image = known[name][0](image, arg)
    return image
