"""``medlens process``: a named-step pipeline, from a string ("window:lung,denoise:nlm") or YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from medlens.errors import ConfigError
from medlens.io.image import Image


def _f(s):
    return float(s)


def _steps() -> dict[str, tuple[Callable[[Image, str | None], Image], str]]:
    from medlens.imaging import denoise, enhance, filters, segment
    from medlens.io import resample

    def as_img(img, arr):
        return img.with_array(np.asarray(arr))

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
        "clahe": (lambda img, a: enhance.clahe(img, _f(a) if a else 2.0), "CLAHE (clip limit)"),
        "unsharp": (lambda img, a: enhance.unsharp(img, amount=_f(a) if a else 1.0), "unsharp masking (amount)"),
        "gaussian": (lambda img, a: filters.gaussian(img, _f(a) if a else 1.0), "Gaussian (sigma, voxels)"),
        "median": (lambda img, a: filters.median(img, int(a) if a else 3), "median (size)"),
        "bilateral": (lambda img, a: filters.bilateral(img, _f(a) if a else 2.0), "bilateral (spatial sigma)"),
        "diffusion": (lambda img, a: filters.anisotropic_diffusion(img, int(a) if a else 10), "anisotropic diffusion"),
        "lowpass": (lambda img, a: filters.fft_filter(img, "lowpass", _f(a) if a else 0.1), "FFT low-pass (cutoff)"),
        "highpass": (lambda img, a: filters.fft_filter(img, "highpass", _f(a) if a else 0.1), "FFT high-pass"),
        "denoise": (denoise_step, "denoise:nlm|wavelet|visushrink|tv|median"),
        "otsu": (lambda img, a: as_img(img, segment.otsu(img).astype(np.uint8)), "Otsu mask"),
        "lungs": (lambda img, a: as_img(img, segment.lung_mask(img).astype(np.uint8)), "CT lung-field mask"),
        "resample": (lambda img, a: resample(img, _f(a) if a else 1.0), "isotropic resample (mm)"),
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
        steps.append((name, arg))
    if not steps:
        raise ConfigError("no processing steps given")
    return steps


def load_steps(path_or_spec: str) -> list[tuple[str, str | None]]:
    p = Path(path_or_spec)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        if not p.exists():
            raise ConfigError("pipeline file not found", p)
        d = yaml.safe_load(p.read_text())
        return parse_steps(d.get("steps", d) if isinstance(d, dict) else d)
    return parse_steps(path_or_spec)


def run_steps(image: Image, steps: list[tuple[str, str | None]]) -> Image:
    known = _steps()
    for name, arg in steps:
        image = known[name][0](image, arg)
    return image
