"""Splitting a segmented component at its narrow necks, to judge each part on its own.

The segmenter can join a node to the tissue beside it (a vessel, the bowel wall) through a
thin bridge of voxels above threshold. The joined whole is then measured and judged as one
candidate, and the checker rejects it, node and all. Where the checker rejects a component
that narrows, its parts are judged in its place (`inference.pipeline`), each kept only when
the checker is at least `part_threshold` sure of it (a component split into many parts
gives the checker as many more chances to err); kept parts of one component that touch
are joined again (`inference.nodes.rejoined`). A component the checker keeps is not split.

A component is split where two parts of it are each clearly thicker than the bridge between
them: at the smallest depth `t` (distance to the component's edge, mm) at which the voxels
deeper than `t` fall into two or more pieces that each reach a depth of at least
`t / ratio`, with `t` no more than `max_neck_mm`. Those pieces seed a watershed on the depth,
which gives every voxel of the component to one of them. Each part is split again the same
way. A ratio of 0.7 and a `max_neck_mm` of 2.5 split two parts joined by a bridge under 5 mm
across and less than 0.7 times as thick as the thinner part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

LEVEL_STEP_MM = 0.5  # between the depths tried
MAX_DEPTH = 4  # splits of a split part, at most


@dataclass(frozen=True)
class Necks:
    """Where a component is split, and how sure the checker must be of a part (the model
    card's `segmenter.necks`)."""

    ratio: float  # a bridge thinner than this share of the thinner part's depth
    max_neck_mm: float  # and no deeper than this (mm from the edge)
    part_threshold: float  # a part of a rejected component is kept at this checker probability

    @classmethod
    def from_card(cls, entry: dict | None) -> Necks | None:
        """The card's entry (None: components are not split); ValueError when it is not one."""
        if entry is None:
            return None
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            raise ValueError(f"needs exactly {', '.join(FIELDS)}, not {entry!r}")
        for name in FIELDS:
            v = entry[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"{name} {v!r} is not a positive number")
        for name in ("ratio", "part_threshold"):
            if entry[name] >= 1:
                raise ValueError(f"{name} {entry[name]!r} is not below 1")
        return cls(*(float(entry[name]) for name in FIELDS))

    def to_card(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = ("ratio", "max_neck_mm", "part_threshold")


def split_component(
    comp: np.ndarray, necks: Necks, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), depth: int = 0
) -> list[np.ndarray]:
    """The parts of one component (a bool mask) split at its necks, as masks of its shape; the
    component itself where it has no neck."""
    dist = ndimage.distance_transform_edt(np.pad(comp, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    seeds = _seeds(dist, necks)
    if seeds is None or depth >= MAX_DEPTH:
        return [comp]
    parts = watershed(-dist, seeds, mask=comp)
    out: list[np.ndarray] = []
    for n in range(1, int(parts.max()) + 1):
        part = parts == n
        if part.any():
            out.extend(split_component(part, necks, spacing, depth + 1))
    return out


def _seeds(dist: np.ndarray, necks: Necks) -> np.ndarray | None:
    """Labelled seeds of the parts (the deep pieces at the first depth where two or more
    pieces are thick enough), or None where the component has no neck."""
    highest = min(float(dist.max()) * necks.ratio, necks.max_neck_mm)
    for t in np.arange(LEVEL_STEP_MM, highest + 1e-9, LEVEL_STEP_MM):
        pieces, n = ndimage.label(dist > t)
        if n < 2:
            continue
        reach = ndimage.maximum(dist, pieces, index=np.arange(1, n + 1))
        thick = [i + 1 for i, r in enumerate(reach) if r * necks.ratio >= t]
        if len(thick) < 2:
            continue
        seeds = np.zeros(dist.shape, dtype=np.int32)
        for k, lab in enumerate(thick, start=1):
            seeds[pieces == lab] = k
        return seeds
    return None
