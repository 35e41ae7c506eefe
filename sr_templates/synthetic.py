"""Hand-made findings of known geometry, for tests, the encode benchmark and demos.

`ellipsoid_finding` builds the `Finding` that a perfect detector would report for an
axis-aligned ellipsoid in a volume: exact mask, centroid, key slice, RECIST long and short
axis on the key slice (endpoints in LPS and in SCOORD pixel coordinates) and volume.  It does
not need the real pipeline, so the writers can be tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inference.findings import AxisLine, Finding, ModelInfo, SliceRef, StudyFindings

__all__ = ["ellipsoid_finding", "ellipsoid_mask", "paint", "study_findings"]


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _to_lps(affine: np.ndarray, kji: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(affine, dtype=float)
    p = a[:3, :3] @ np.asarray(kji, dtype=float) + a[:3, 3]
    return (float(p[0]), float(p[1]), float(p[2]))


def ellipsoid_mask(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    center_kji: Sequence[float],
    radii_mm: Sequence[float],
) -> tuple[tuple[int, int, int, int, int, int], np.ndarray]:
    """Tight bbox (k0, j0, i0, k1, j1, i1) and bool mask of an axis-aligned ellipsoid.

    `radii_mm` are the semi-axes along the k, j and i axes of the volume.
    """
    spacing = _spacing(affine)
    c = np.asarray(center_kji, dtype=float)
    r_vox = np.asarray(radii_mm, dtype=float) / spacing
    lo = np.maximum(np.floor(c - r_vox).astype(int), 0)
    hi = np.minimum(np.ceil(c + r_vox).astype(int) + 1, np.asarray(shape))
    kk, jj, ii = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    mask = ((kk - c[0]) / r_vox[0]) ** 2 + ((jj - c[1]) / r_vox[1]) ** 2 + (
        (ii - c[2]) / r_vox[2]
    ) ** 2 <= 1.0
    if not mask.any():
        raise ValueError(f"ellipsoid at {tuple(c)} with radii {tuple(radii_mm)} mm has no voxel")
    nz = np.nonzero(mask)
    t_lo = [int(a.min()) for a in nz]
    t_hi = [int(a.max()) + 1 for a in nz]
    mask = mask[t_lo[0] : t_hi[0], t_lo[1] : t_hi[1], t_lo[2] : t_hi[2]]
    bbox = (
        int(lo[0] + t_lo[0]),
        int(lo[1] + t_lo[1]),
        int(lo[2] + t_lo[2]),
        int(lo[0] + t_hi[0]),
        int(lo[1] + t_hi[1]),
        int(lo[2] + t_hi[2]),
    )
    return bbox, mask


def ellipsoid_finding(
    *,
    label: str,
    tracking_uid: str,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    center_kji: Sequence[float],
    radii_mm: Sequence[float],
    malignancy_probability: float = 0.3,
    size_category: str = "normal",
    mean_hu: float = 40.0,
    flags: tuple[str, ...] = (),
) -> Finding:
    """The `Finding` for an axis-aligned ellipsoid (see module docstring)."""
    bbox, mask = ellipsoid_mask(shape, affine, center_kji, radii_mm)
    k0, j0, i0 = bbox[:3]
    spacing = _spacing(affine)
    idx = np.argwhere(mask) + np.array([k0, j0, i0])
    centroid_voxel = tuple(float(v) for v in idx.mean(axis=0))
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    key = k0 + int(np.argmax(areas))

    # Cross-section of the ellipsoid on the key slice: an ellipse with these semi-axes (mm).
    ck, cj, ci = (float(v) for v in center_kji)
    rk, rj, ri = (float(v) for v in radii_mm)
    scale = math.sqrt(max(0.0, 1.0 - ((key - ck) * spacing[0] / rk) ** 2))
    semi_j, semi_i = rj * scale, ri * scale

    def line(axis: str, semi_mm: float) -> AxisLine:
        if axis == "i":
            d = semi_mm / spacing[2]
            ends = ((key, cj, ci - d), (key, cj, ci + d))
        else:
            d = semi_mm / spacing[1]
            ends = ((key, cj - d, ci), (key, cj + d, ci))
        return AxisLine(
            length_mm=2.0 * semi_mm,
            endpoints_lps_mm=(_to_lps(affine, ends[0]), _to_lps(affine, ends[1])),
            endpoints_pixel=(
                (ends[0][2] + 0.5, ends[0][1] + 0.5),
                (ends[1][2] + 0.5, ends[1][1] + 0.5),
            ),
        )

    if semi_i >= semi_j:
        long_axis, short_axis = line("i", semi_i), line("j", semi_j)
    else:
        long_axis, short_axis = line("j", semi_j), line("i", semi_i)
    return Finding(
        label=label,
        tracking_uid=tracking_uid,
        bbox=bbox,
        mask=mask,
        centroid_lps_mm=_to_lps(affine, centroid_voxel),
        centroid_voxel=centroid_voxel,  # type: ignore[arg-type]
        key_slice=key,
        long_axis=long_axis,
        short_axis=short_axis,
        volume_mm3=float(mask.sum() * float(np.prod(spacing))),
        mean_hu=float(mean_hu),
        malignancy_probability=float(malignancy_probability),
        size_category=size_category,
        flags=tuple(flags),
    )


def paint(array: np.ndarray, finding: Finding, hu: float) -> None:
    """Set the voxels of `finding` in `array` (k, j, i) to `hu` (in place)."""
    k0, j0, i0, k1, j1, i1 = finding.bbox
    array[k0:k1, j0:j1, i0:i1][finding.mask] = hu


def study_findings(
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    slices: Sequence[SliceRef],
    shape: tuple[int, int, int],
    affine: np.ndarray,
    findings: Sequence[Finding],
    model: ModelInfo | None = None,
) -> StudyFindings:
    """A `StudyFindings` with a default demo model."""
    return StudyFindings(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        slices=tuple(slices),
        shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        affine=np.asarray(affine, dtype=float),
        model=model or ModelInfo(name="nodal-ln-demo", version="0.0.1"),
        findings=tuple(findings),
    )
