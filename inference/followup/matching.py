"""One-to-one matching of prior nodes (mapped into the current frame) to current nodes.

The Hungarian method (`scipy.optimize.linear_sum_assignment`) minimises the summed distance
between matched centroids; a pair is allowed only within the distance gate, max(`gate_min_mm`,
`gate_long_axis_factor` x the larger long axis of the two), so that a large node may have
moved further (its centroid shifts more as it grows or shrinks) than a small one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from inference.followup.types import FollowUpError, FollowUpSettings

_FORBIDDEN = 1e9


def gate_mm(long_axis_mm: float, settings: FollowUpSettings) -> float:
    """The largest centroid distance at which a node of this long axis may be matched."""
    return max(settings.gate_min_mm, settings.gate_long_axis_factor * float(long_axis_mm))


def match(
    prior_centroids: Sequence[Sequence[float]],
    prior_long_axes: Sequence[float],
    current_centroids: Sequence[Sequence[float]],
    current_long_axes: Sequence[float],
    settings: FollowUpSettings | None = None,
) -> list[tuple[int, int, float]]:
    """(prior index, current index, distance mm) of each matched pair, by prior index.

    Prior nodes not in the result are gone, current nodes not in it are new.
    """
    settings = settings or FollowUpSettings()
    p = _points(prior_centroids, "prior")
    c = _points(current_centroids, "current")
    if len(prior_long_axes) != len(p) or len(current_long_axes) != len(c):
        raise FollowUpError("one long axis per centroid is needed")
    if len(p) == 0 or len(c) == 0:
        return []
    distance = np.linalg.norm(p[:, None, :] - c[None, :, :], axis=-1)
    gate = np.maximum(
        np.array([gate_mm(a, settings) for a in prior_long_axes])[:, None],
        np.array([gate_mm(a, settings) for a in current_long_axes])[None, :],
    )
    cost = np.where(distance <= gate, distance, _FORBIDDEN)
    rows, cols = linear_sum_assignment(cost)
    return sorted(
        (int(r), int(k), float(distance[r, k]))
        for r, k in zip(rows, cols, strict=True)
        if cost[r, k] < _FORBIDDEN
    )


def _points(points: Sequence[Sequence[float]], name: str) -> np.ndarray:
    a = np.asarray(points, dtype=float).reshape(-1, 3) if len(points) else np.zeros((0, 3))
    if not np.isfinite(a).all():
        raise FollowUpError(f"{name} centroids must be finite LPS coordinates")
    return a
