"""RECIST-style diameters of a node on one axial slice, with sub-voxel contours.

Pure NumPy/scikit-image: a 2D soft mask (probability or binary) and the pixel spacing in,
the long axis (greatest diameter) and the short axis (greatest diameter perpendicular to
it) out, each with its two endpoints in (row, column) pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

EDGE_SIGMA_PX = 0.6  # of the coarser pixel side, the same in mm along both axes


@dataclass(frozen=True)
class Diameters:
    long_mm: float
    short_mm: float
    long_endpoints: tuple[tuple[float, float], tuple[float, float]]  # (row, column) pixels
    short_endpoints: tuple[tuple[float, float], tuple[float, float]]


def axial_diameters(soft: np.ndarray, spacing_ji: tuple[float, float], level: float = 0.5) -> Diameters:
    """Long and perpendicular short axis of the largest contour of `soft` at `level`."""
    # A light blur turns the staircase edge of a binary mask into a smooth contour whose
    # 0.5 level lies on the true boundary; smooth probability maps are barely changed.
    padded = ndimage.gaussian_filter(
        np.pad(np.asarray(soft, dtype=float), 3), EDGE_SIGMA_PX * max(spacing_ji) / np.asarray(spacing_ji)
    )
    contours = measure.find_contours(padded, level)
    if not contours:
        raise ValueError("the node has no contour on its key slice")
    pts = max(contours, key=len) - 3.0  # (row, column), undo the padding
    mm = pts * np.asarray(spacing_ji, float)
    a, b = _farthest_pair(mm)
    long_mm = float(np.linalg.norm(mm[b] - mm[a]))
    if long_mm == 0:
        raise ValueError("the node's contour is a single point")
    d = (mm[b] - mm[a]) / long_mm
    n = np.array([-d[1], d[0]])
    short_mm, s0, s1 = _widest_chord(mm, d, n)
    to_px = 1.0 / np.asarray(spacing_ji, float)
    return Diameters(
        long_mm=long_mm,
        short_mm=short_mm,
        long_endpoints=(tuple(pts[a]), tuple(pts[b])),
        short_endpoints=(tuple(s0 * to_px), tuple(s1 * to_px)),
    )


def _farthest_pair(p: np.ndarray) -> tuple[int, int]:
    if len(p) > 600:  # the farthest pair lies on the convex hull
        from scipy.spatial import ConvexHull

        idx = ConvexHull(p).vertices
    else:
        idx = np.arange(len(p))
    q = p[idx]
    d2 = ((q[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    a, b = np.unravel_index(np.argmax(d2), d2.shape)
    return int(idx[a]), int(idx[b])


def _widest_chord(p: np.ndarray, d: np.ndarray, n: np.ndarray):
    """Longest chord of the closed polygon `p` along direction `n` (perpendicular to `d`)."""
    u, v = p @ d, p @ n
    closed_u, closed_v = np.append(u, u[0]), np.append(v, v[0])
    best = (0.0, p[0], p[0])
    for t in np.linspace(u.min(), u.max(), 200)[1:-1]:
        u0, u1, v0, v1 = closed_u[:-1], closed_u[1:], closed_v[:-1], closed_v[1:]
        cross = (u0 - t) * (u1 - t) <= 0
        cross &= u0 != u1
        if cross.sum() < 2:
            continue
        w = (t - u0[cross]) / (u1[cross] - u0[cross])
        vs = v0[cross] + w * (v1[cross] - v0[cross])
        length = float(vs.max() - vs.min())
        if length > best[0]:
            best = (length, t * d + vs.min() * n, t * d + vs.max() * n)
    return best
