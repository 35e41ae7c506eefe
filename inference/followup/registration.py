"""Prior CT to current CT: rigid, then affine, on body and bone (SimpleITK).

Both volumes are averaged down to a coarse grid (`FollowUpSettings.registration_grid_mm`,
4 mm by default), so that a 300-slice CT registers in seconds (benchmarks/RESULTS.md):

1. the body masks' centres of mass give the starting translation;
2. rigid (Euler 3D), Mattes mutual information over the current body (HU > -500);
3. affine, the same metric over the current bone (HU > 250), started from the rigid result.

The quality figure is the mean distance of the registered prior bone surface to the current
bone (`Registration.bone_residual_mm`). The affine result is kept only where it beats the
rigid one on that figure; a registration worse than no registration at all, or worse than
`max_bone_residual_mm`, is rejected: the comparison then runs on the unregistered
coordinates and the registration says why (`Registration.note`).
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from inference.followup.types import FollowUpError, FollowUpSettings, Matrix4, Registration
from inference.volume import Volume

#: the seed of the metric's sampling: the same inputs always give the same transform
SAMPLING_SEED = 20261
SAMPLING_PERCENTAGE = 0.1
MIN_BODY_VOXELS = 500
#: one thread: with several, ITK's metric sums the threads' parts in the order they finish
#: and the transform differs from run to run (by up to a tenth of a millimetre)
THREADS = 1


def register(prior: Volume, current: Volume, settings: FollowUpSettings | None = None) -> Registration:
    """The transform that maps prior LPS to current LPS, with its quality figure.

    Runs SimpleITK on `THREADS` thread(s) (its process-wide default, restored afterwards), so
    that the same inputs give the same transform."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    try:
        return _register(prior, current, settings or FollowUpSettings())
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(prior: Volume, current: Volume, settings: FollowUpSettings) -> Registration:
    started = time.perf_counter()
    if settings.registration == "none":
        return Registration(method="identity", note="registration switched off (settings)")
    fixed = _coarse(current, settings.registration_grid_mm, "current")
    moving = _coarse(prior, settings.registration_grid_mm, "prior")
    fixed_body, moving_body = fixed > settings.body_hu, moving > settings.body_hu
    for name, body in (("current", fixed_body), ("prior", moving_body)):
        if _count(body) < MIN_BODY_VOXELS:
            return Registration(
                method="identity",
                note=f"the {name} CT shows too little body (HU > {settings.body_hu:g}) to register",
                seconds=time.perf_counter() - started,
            )
    fixed_bone = fixed > settings.bone_hu
    moving_bone = moving > settings.bone_hu
    distance = _distance_to(fixed_bone)
    bone_points = _surface_points(moving_bone)
    identity_residual = _residual(distance, bone_points, np.eye(4))
    try:
        initial = sitk.CenteredTransformInitializer(
            sitk.Cast(fixed_body, sitk.sitkFloat32),
            sitk.Cast(moving_body, sitk.sitkFloat32),
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        rigid, rigid_metric = _run(fixed, moving, initial, fixed_body, iterations=100)
        candidates = [("rigid", rigid, rigid_metric)]
        if settings.registration == "affine" and _count(fixed_bone) >= MIN_BODY_VOXELS // 5:
            affine = _affine_of(rigid)
            mask = sitk.BinaryDilate(fixed_bone, [2, 2, 2])
            candidates.append(("affine", *_run(fixed, moving, affine, mask, iterations=60)))
    except RuntimeError as exc:  # ITK's errors (e.g. no overlap left to sample)
        return Registration(
            method="identity",
            note=f"registration failed ({_first_line(exc)}); nodes matched without it",
            bone_residual_mm=identity_residual,
            seconds=time.perf_counter() - started,
        )
    scored = []
    for method, transform, metric in candidates:
        matrix = _prior_to_current(transform)
        scored.append((_residual(distance, bone_points, matrix), method, matrix, metric))
    best = min(scored, key=lambda s: (s[0] + (0.1 if s[1] == "affine" else 0.0), s[1]))
    residual, method, matrix, metric = best
    seconds = time.perf_counter() - started
    if residual > settings.max_bone_residual_mm or residual > identity_residual:
        return Registration(
            method="identity",
            metric=metric,
            bone_residual_mm=identity_residual,
            note=(
                f"{method} registration rejected: bone residual {residual:.1f} mm "
                f"(unregistered {identity_residual:.1f} mm, limit {settings.max_bone_residual_mm:g} mm)"
            ),
            seconds=seconds,
        )
    return Registration(
        method=method,
        matrix=_tuple(matrix),
        metric=metric,
        bone_residual_mm=residual,
        seconds=seconds,
    )


def to_sitk(volume: Volume) -> sitk.Image:
    """`volume` as a SimpleITK image in the same physical (LPS) space."""
    array = np.asarray(volume.array)
    if array.ndim != 3 or min(array.shape) < 1:
        raise FollowUpError(f"a CT volume must be 3D, got an array of shape {array.shape}")
    affine = np.asarray(volume.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise FollowUpError("the volume's affine must be a finite 4x4 matrix")
    columns = affine[:3, [2, 1, 0]]  # ITK index order (i, j, k)
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise FollowUpError(f"the volume's voxel spacing must be positive, got {spacing.tolist()}")
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in (columns / spacing).ravel()))
    return image


def _coarse(volume: Volume, grid_mm: float, name: str) -> sitk.Image:
    """`volume` averaged down to about `grid_mm` voxels (block means: no aliasing).

    The blocks are averaged in NumPy on the volume's own array, without first copying the
    full-resolution volume into SimpleITK (a 300-slice CT is 300 MB)."""
    array = np.asarray(volume.array)
    if array.ndim != 3 or min(array.shape) < 1:
        raise FollowUpError(f"the {name} CT must be a 3D volume, got an array of shape {array.shape}")
    affine = np.asarray(volume.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise FollowUpError(f"the {name} CT's affine must be a finite 4x4 matrix")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # along k, j, i
    if np.any(spacing <= 0):
        raise FollowUpError(f"the {name} CT's voxel spacing must be positive, got {spacing.tolist()}")
    factors = [max(1, min(round(grid_mm / s), n)) for s, n in zip(spacing, array.shape, strict=True)]
    kept = [n - n % f for n, f in zip(array.shape, factors, strict=True)]
    fk, fj, fi = factors
    nk, nj, ni = kept[0] // fk, kept[1] // fj, kept[2] // fi
    # outer axes first: each sum then runs over long contiguous rows (4x faster than one
    # reduction over the three block axes)
    x = array[: kept[0], : kept[1], : kept[2]].reshape(nk, fk, kept[1], kept[2]).sum(1, dtype=np.float32)
    x = x.reshape(nk, nj, fj, kept[2]).sum(2, dtype=np.float32)
    coarse = x.reshape(nk, nj, ni, fi).sum(3, dtype=np.float32) / float(fk * fj * fi)
    if not np.isfinite(coarse).all():
        raise FollowUpError(f"the {name} CT holds values that are not finite")
    shrunk = affine.copy()
    shrunk[:3, :3] = affine[:3, :3] * np.asarray(factors, float)
    shrunk[:3, 3] = affine[:3, :3] @ ((np.asarray(factors, float) - 1) / 2) + affine[:3, 3]
    return to_sitk(Volume(coarse, shrunk, (), "", "", ""))


def _run(fixed, moving, initial, mask, *, iterations: int) -> tuple[sitk.Transform, float]:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, SAMPLING_SEED)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=0.01, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=False)
    clipped_fixed = sitk.Clamp(fixed, sitk.sitkFloat32, -1000.0, 1500.0)
    clipped_moving = sitk.Clamp(moving, sitk.sitkFloat32, -1000.0, 1500.0)
    transform = method.Execute(clipped_fixed, clipped_moving)
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0) if transform.GetNumberOfTransforms() == 1 else transform
    return transform, float(method.GetMetricValue())


def _affine_of(transform: sitk.Transform) -> sitk.AffineTransform:
    """`transform` (rigid or affine, as the registration returns it) as an affine transform."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    if transform.GetName() == "Euler3DTransform":
        euler = sitk.Euler3DTransform(transform)
        generic = sitk.AffineTransform(3)
        generic.SetMatrix(euler.GetMatrix())
        generic.SetTranslation(euler.GetTranslation())
        generic.SetCenter(euler.GetCenter())
        return generic
    return sitk.AffineTransform(transform)


def _prior_to_current(transform: sitk.Transform) -> np.ndarray:
    """4x4 prior -> current from ITK's transform, which maps current (fixed) to prior (moving)."""
    generic = _affine_of(transform)
    a = np.asarray(generic.GetMatrix(), float).reshape(3, 3)
    c = np.asarray(generic.GetCenter(), float)
    t = np.asarray(generic.GetTranslation(), float)
    forward = np.eye(4)
    forward[:3, :3] = a
    forward[:3, 3] = t + c - a @ c
    return np.linalg.inv(forward)


def _distance_to(mask: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """Unsigned distance (mm) to `mask` and the map's array, for looking up points."""
    if _count(mask) == 0:
        return mask, np.zeros(0)
    dist = sitk.SignedMaurerDistanceMap(
        mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return dist, np.maximum(sitk.GetArrayViewFromImage(dist), 0.0)


def _surface_points(mask: sitk.Image) -> np.ndarray:
    """Physical points (N, 3) of the boundary voxels of `mask`."""
    if _count(mask) == 0:
        return np.zeros((0, 3))
    contour = sitk.BinaryContour(mask)  # kept in a name: a view of a freed image reads garbage
    edge = sitk.GetArrayFromImage(contour) > 0
    kji = np.argwhere(edge)
    if len(kji) > 20000:
        kji = kji[:: len(kji) // 20000 + 1]
    direction = np.asarray(mask.GetDirection(), float).reshape(3, 3)
    ijk = kji[:, ::-1] * np.asarray(mask.GetSpacing(), float)
    return ijk @ direction.T + np.asarray(mask.GetOrigin(), float)


def _residual(distance: tuple[sitk.Image, np.ndarray], points: np.ndarray, matrix: np.ndarray) -> float:
    """Mean distance (mm) of `points` mapped by `matrix` to the current bone; inf when none."""
    image, values = distance
    if values.size == 0 or len(points) == 0:
        return float("inf")
    mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    ijk = (mapped - np.asarray(image.GetOrigin(), float)) @ direction / np.asarray(image.GetSpacing(), float)
    idx = np.rint(ijk).astype(int)
    size = np.asarray(image.GetSize())
    inside = np.all((idx >= 0) & (idx < size), axis=1)
    if inside.mean() < 0.5:
        return float("inf")
    i, j, k = idx[inside].T
    return float(values[k, j, i].mean())


def _count(mask: sitk.Image) -> int:
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))


def _tuple(m: np.ndarray) -> Matrix4:
    return tuple(tuple(float(v) for v in row) for row in m)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]
