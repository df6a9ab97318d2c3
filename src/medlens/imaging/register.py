"""Registration (SimpleITK): rigid, affine and B-spline, intensity-based (Mattes MI) or landmark-based.

A registration returns a ``Registration`` holding the SimpleITK transform (fixed -> moving physical
mapping); it can be saved (``.tfm``), applied to images (linear) and masks (nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlens.errors import ConfigError, DataError
from medlens.io.image import Image
from medlens.io.limits import require_utf8
from medlens.io.sitk_io import from_sitk, to_sitk
from medlens.utils import atomic_path


@dataclass
class Registration:
    transform: object  # SimpleITK.Transform
    metric: float
    kind: str

    def save(self, path: str | Path) -> Path:
        """Write the transform (``.tfm``, ``.txt``, ``.h5``, ``.mat``) atomically."""
        require_utf8(path, "transform path")  # SimpleITK aborts the process on such a path
        with atomic_path(path) as tmp:
            sitk.WriteTransform(self.transform, str(tmp))
        return Path(path)

    def apply(self, moving: Image, fixed: Image, mask: bool = False, default: float | None = None) -> Image:
        """Resample ``moving`` onto ``fixed``'s grid (nearest neighbour for masks)."""
        interp = sitk.sitkNearestNeighbor if mask else sitk.sitkLinear
        fill = 0.0 if mask else (float(moving.array.min()) if default is None else default)
        out = sitk.Resample(to_sitk(moving), to_sitk(fixed), self.transform, interp, fill,
                            to_sitk(moving).GetPixelID())
        return from_sitk(out, moving.modality, moving.meta)


def load_transform(path: str | Path) -> Registration:
    if not Path(path).exists():
        raise DataError("transform file not found", path)
    require_utf8(path, "transform path")
    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as e:
        raise DataError(f"unreadable transform ({' '.join(str(e).split())[-200:]})", path) from None
    return Registration(tx, float("nan"), "loaded")


def register(fixed: Image, moving: Image, kind: str = "rigid", iterations: int = 200, bspline_grid: int = 6,
             sampling: float = 0.2, seed: int = 0, progress: Callable[[int, int], None] | None = None
             ) -> Registration:
    """Intensity-based registration with Mattes mutual information (multi-resolution, gradient descent).

    ``kind``: ``rigid`` (Euler), ``affine`` (rigid first, then affine) or ``bspline`` (affine first,
    then a free-form B-spline on a ``bspline_grid`` control grid). Works across modalities.
    ``seed`` seeds the metric's random sampling: the same images and seed give the same transform.
    ``progress(done, total)`` is called from SimpleITK's iteration events: ``total`` is the iteration budget
    of all stages and levels; a level that converges early jumps to its budget's end.
    """
    if kind not in ("rigid", "affine", "bspline"):
        raise ConfigError(f"unknown registration '{kind}'; expected rigid, affine or bspline")
    if fixed.spatial_dims != moving.spatial_dims:
        raise DataError(f"fixed is {fixed.spatial_dims}D, moving is {moving.spatial_dims}D")
    f = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    m = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    nd = fixed.spatial_dims
    levels = 3
    budgets = [iterations * levels] * (1 if kind == "rigid" else 2) + \
        ([max(50, iterations // 2) * levels] if kind == "bspline" else [])
    total = sum(budgets)

    def run(reg, stage: int) -> None:
        """Execute one stage, reporting its iterations to ``progress``."""
        base = sum(budgets[:stage])
        per = budgets[stage] // levels
        if progress is not None:
            tell = progress
            report = lambda: tell(base + reg.GetCurrentLevel() * per + min(reg.GetOptimizerIteration() + 1, per),  # noqa: E731
                                  total)
            reg.AddCommand(sitk.sitkIterationEvent, report)
        reg.Execute(f, m)
        if progress is not None:
            progress(base + budgets[stage], total)

    def method(moving_initial=None, lbfgs=False):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, seed + 1)  # ITK reads a seed of 0 as 'the wall clock'
        reg.SetInterpolator(sitk.sitkLinear)
        if lbfgs:
            reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=max(50, iterations // 2))
        else:
            reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                         relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
            reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        if moving_initial is not None:
            reg.SetMovingInitialTransform(moving_initial)
        return reg

    # each stage optimises one transform alone; the previous stages are its starting point
    euler = sitk.Euler3DTransform() if nd == 3 else sitk.Euler2DTransform()
    init = sitk.CenteredTransformInitializer(f, m, euler, sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = method()
    reg.SetInitialTransform(init, inPlace=True)
    run(reg, 0)
    tx, metric = init, reg.GetMetricValue()
    if kind in ("affine", "bspline"):
        aff = sitk.AffineTransform(nd)
        aff.SetCenter(init.GetCenter())
        aff.SetMatrix(init.GetMatrix())
        aff.SetTranslation(init.GetTranslation())
        reg = method()
        reg.SetInitialTransform(aff, inPlace=True)
        run(reg, 1)
        tx, metric = aff, reg.GetMetricValue()
    if kind == "bspline":
        bs = sitk.BSplineTransformInitializer(f, [bspline_grid] * nd)
        reg = method(moving_initial=tx, lbfgs=True)
        reg.SetInitialTransform(bs, inPlace=True)
        run(reg, 2)
        comp = sitk.CompositeTransform(tx)
        comp.AddTransform(bs)  # applied first: bspline, then the affine
        tx, metric = comp, reg.GetMetricValue()
    return Registration(tx, float(metric), kind)


def register_landmarks(fixed_points, moving_points, kind: str = "rigid") -> Registration:
    """Landmark registration: least-squares rigid (Kabsch) or affine from paired world points (N, 3)."""
    fp, mp = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    if fp.shape != mp.shape or fp.ndim != 2 or len(fp) < fp.shape[1] + 1:
        raise DataError(f"need matching landmark lists with at least {fp.shape[-1] + 1} points, got {fp.shape} "
                        f"and {mp.shape}")
    nd = fp.shape[1]
    if kind == "rigid":
        cf, cm = fp.mean(0), mp.mean(0)
        u, _, vt = np.linalg.svd((fp - cf).T @ (mp - cm))
        d = np.sign(np.linalg.det(vt.T @ u.T))
        corr = np.diag([1.0] * (nd - 1) + [d])
        r = vt.T @ corr @ u.T  # maps fixed -> moving
        t = cm - r @ cf
    elif kind == "affine":
        A = np.hstack([fp, np.ones((len(fp), 1))])
        sol, *_ = np.linalg.lstsq(A, mp, rcond=None)
        r, t = sol[:nd].T, sol[nd]
    else:
        raise ConfigError(f"unknown landmark registration '{kind}'; expected rigid or affine")
    tx = sitk.AffineTransform(nd)
    tx.SetMatrix(r.ravel().tolist())
    tx.SetTranslation(t.tolist())
    resid = float(np.sqrt(((fp @ r.T + t - mp) ** 2).sum(1)).mean())
    return Registration(tx, resid, f"landmark-{kind}")
