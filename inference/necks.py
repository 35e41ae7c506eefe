"""Splitting a segmented component at its narrow necks.

The segmenter can join a node to the tissue beside it (a vessel, the bowel wall, another
node) through a thin bridge of voxels above threshold. The joined whole is then measured and
judged as one candidate, and the checker rejects it, node and all. Splitting each component
where it narrows gives the node back as a candidate of its own.

A component is split where two parts of it are each clearly thicker than the bridge between
them: at the smallest depth `t` (distance to the component's edge, in working voxels, 1 mm
on the working grid) at which the voxels deeper than `t` fall into two or more pieces that
each reach a depth of at least `t / neck_ratio`. Those pieces seed a watershed on the depth,
which gives every voxel of the component to one of them. Each part is split again the same
way. A neck_ratio of 0.5 splits two parts joined by a bridge less than half as thick as the
thinner of them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

LEVEL_STEP = 0.5  # working voxels between the depths tried
MAX_DEPTH = 4  # splits of a split part, at most


def split_labels(labels: np.ndarray, count: int, neck_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """`labels` (components 1..count) with every component split at its necks: the new label
    image (parts numbered from 1) and, for each part, the component it came from
    (`origin[part - 1]`)."""
    out = np.zeros_like(labels)
    origin: list[int] = []
    for idx, sl in enumerate(ndimage.find_objects(labels, max_label=count), start=1):
        if sl is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        comp = labels[box] == idx
        for part in split_component(comp, neck_ratio):
            origin.append(idx)
            out[box][part] = len(origin)
    return out, np.array(origin, dtype=int)


def split_component(comp: np.ndarray, neck_ratio: float, depth: int = 0) -> list[np.ndarray]:
    """The parts of one component (a bool mask) split at its necks, as masks of its shape; the
    component itself where it has no neck."""
    padded = np.pad(comp, 1)
    dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]
    seeds = _seeds(dist, neck_ratio)
    if seeds is None or depth >= MAX_DEPTH:
        return [comp]
    parts = watershed(-dist, seeds, mask=comp)
    out: list[np.ndarray] = []
    for n in range(1, int(parts.max()) + 1):
        part = parts == n
        if part.any():
            out.extend(split_component(part, neck_ratio, depth + 1))
    return out


def _seeds(dist: np.ndarray, neck_ratio: float) -> np.ndarray | None:
    """Labelled seeds of the parts (the deep pieces at the first depth where two or more
    pieces are thick enough), or None where the component has no neck."""
    deepest = float(dist.max())
    for t in np.arange(LEVEL_STEP, deepest * neck_ratio + 1e-9, LEVEL_STEP):
        pieces, n = ndimage.label(dist > t)
        if n < 2:
            continue
        reach = ndimage.maximum(dist, pieces, index=np.arange(1, n + 1))
        thick = [i + 1 for i, r in enumerate(reach) if r * neck_ratio >= t]
        if len(thick) < 2:
            continue
        seeds = np.zeros(dist.shape, dtype=np.int32)
        for k, lab in enumerate(thick, start=1):
            seeds[pieces == lab] = k
        return seeds
    return None
