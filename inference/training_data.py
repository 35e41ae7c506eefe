"""Training cases on the working grid, from phantoms or from a site's labelled images.

A case is the CT resampled to the working spacing, a node instance map on the same grid
(0 = background, n = node n), per-node malignancy labels where known, and optionally a map
of hard negatives (node-like structures that are not nodes) to sample patches from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference import phantoms
from inference.classify import crop_around
from inference.preprocess import Grid, to_working


@dataclass
class Case:
    image: np.ndarray  # float32 HU on the working grid
    nodes: np.ndarray  # uint8/uint16 node instance map
    malignant: dict[int, bool]  # node index -> label (may be empty)
    axes_mm: dict[int, tuple[float, float]]  # node index -> (short, long) axis
    hard_negative: np.ndarray | None = None  # bool
    mined: np.ndarray | None = None  # bool: where a model marked something that is no node


def nearest(array: np.ndarray, grid: Grid) -> np.ndarray:
    """Carry a label map from the native grid to the working grid (nearest neighbour)."""
    idx = [
        np.clip(np.rint(np.arange(w) * s + lo).astype(int), 0, n - 1)
        for w, s, lo, n in zip(grid.working_shape, grid.scale, grid.crop_lo, array.shape, strict=True)
    ]
    return array[np.ix_(*idx)]


def phantom_case(seed: int, spec: phantoms.PhantomSpec, working_spacing: float) -> Case:
    ph = phantoms.generate(seed, spec)
    sk, sj, si = (float(np.linalg.norm(ph.affine[:3, a])) for a in range(3))
    image, grid = to_working(ph.hu.astype(np.float32), (sk, sj, si), working_spacing)
    nodes = nearest(ph.labels, grid)
    tissue = nearest(ph.tissue, grid)
    hard = np.isin(tissue, phantoms.DISTRACTOR_CODES)
    return Case(
        image=image,
        nodes=nodes,
        malignant={n.index: n.malignant for n in ph.nodes},
        axes_mm={n.index: (n.short_axis_mm, n.long_axis_mm) for n in ph.nodes},
        hard_negative=hard,
    )


def read_site_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """A site's CT (NIfTI file or DICOM folder) in HU as (slice, row, column), its voxel
    spacing in that order, and its label image on the same grid (0 background, 1 lymph
    node, benign or unknown, 2 malignant node): one case of cases.json."""
    from inference.datasets import read_listed_case

    case = read_listed_case(Path(image_path).name, Path(image_path), Path(label_path))
    return case.hu, case.spacing, case.label


def file_case(image_path: Path, label_path: Path, working_spacing: float) -> Case:
    """A site's case on the working grid. Nodes are the connected components of the label > 0."""
    hu, spacing, lab = read_site_case(image_path, label_path)
    return labelled_case(hu, spacing, lab, working_spacing)


def labelled_case(hu: np.ndarray, spacing, label: np.ndarray, working_spacing: float) -> Case:
    """A CT and its 0/1/2 label (same grid) on the working grid: nodes are the connected
    components of the label > 0, malignant when most of their voxels are 2."""
    image, grid = to_working(hu.astype(np.float32), tuple(spacing), working_spacing)
    lab_w = nearest(label.astype(np.uint8), grid)
    inst, _ = ndimage.label(lab_w > 0)
    malignant = {}
    for i, sl in enumerate(ndimage.find_objects(inst), start=1):
        malignant[i] = bool((lab_w[sl][inst[sl] == i] == 2).mean() > 0.5)
    axes = {}
    for i, sl in enumerate(ndimage.find_objects(inst), start=1):
        ext = sorted((s.stop - s.start) * working_spacing for s in sl[1:])
        axes[i] = (ext[0], ext[1])
    return Case(image=image, nodes=inst.astype(np.uint16), malignant=malignant, axes_mm=axes)


def segmentation_patches(
    case: Case,
    count: int,
    size: int,
    rng: np.random.Generator,
    node_share: float = 0.4,
    hard_share: float = 0.3,
    mined_share: float = 0.0,
    node_power: float = 1.0,
):
    """Patches centred on nodes (`node_share`), on hard negatives (`hard_share`: node-like
    tissue such as muscle, vessels, bowel, organs), on a model's own false positives
    (`mined_share`, where `case.mined` is set) and anywhere in the body (the rest).

    A node patch is centred on a voxel of a node. The node is drawn with a weight of its
    voxel count to the power `node_power`, then a voxel of it: at 1 (the default) each node
    voxel alike, so a 30 mm node is drawn about 100 times as often as a 6 mm one; at 0 each
    node alike; at 0.5 the 30 mm node about 10 times as often."""
    shares = (node_share, hard_share, mined_share)
    if min(shares) < 0 or sum(shares) > 1:
        raise ValueError("patch shares must be non-negative and add up to at most 1")
    body = np.flatnonzero(case.image > -500)
    pools = [
        np.flatnonzero(case.nodes > 0),
        None if case.hard_negative is None else np.flatnonzero(case.hard_negative),
        None if case.mined is None else np.flatnonzero(case.mined),
        body,
    ]
    bounds = np.cumsum(shares)
    node_mask = (case.nodes > 0).astype(np.uint8)
    by_node = (  # each node's voxels as flat indices, nodes in label order
        [
            np.ravel_multi_index(ix, case.nodes.shape)
            for _, ix in sorted(ndimage.value_indices(case.nodes, ignore_value=0).items())
        ]
        if node_power != 1
        else []
    )
    weights = np.array([v.size for v in by_node], float) ** node_power
    # equal weights draw as `--per-node` always drew, so its recorded recipes make the same patches
    probs = None if not by_node or np.all(weights == weights[0]) else weights / weights.sum()
    images, masks = [], []
    for _ in range(count):
        kind = int(np.searchsorted(bounds, rng.random(), side="right"))
        pool = _node_pool(by_node, probs, rng) if kind == 0 and by_node else pools[kind]
        if pool is None or pool.size == 0:
            pool = body
        c = np.array(np.unravel_index(rng.choice(pool), case.image.shape)) + rng.integers(-12, 13, 3)
        images.append(_patch(case.image, c, size, -1000.0))
        masks.append(_patch(node_mask, c, size, 0))
    return np.stack(images).astype(np.float16), np.stack(masks).astype(np.uint8)


def _node_pool(by_node: list[np.ndarray], probs: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """One node's voxels, the node drawn by `probs` (None: each node alike)."""
    if probs is None:
        return by_node[rng.integers(len(by_node))]
    return by_node[rng.choice(len(by_node), p=probs)]


def false_positive_map(prob: np.ndarray, nodes: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Components of `prob >= threshold` (working grid) that touch no node of `nodes`."""
    lab, n = ndimage.label(prob >= threshold)
    if n == 0:
        return np.zeros(prob.shape, bool)
    touching = np.unique(lab[(nodes > 0) & (lab > 0)])
    return (lab > 0) & ~np.isin(lab, touching)


def _patch(a: np.ndarray, centre, size: int, fill) -> np.ndarray:
    out = np.full((size,) * 3, fill, dtype=a.dtype)
    lo = np.asarray(centre) - size // 2
    src, dst = [], []
    for ax in range(3):
        s0, s1 = max(lo[ax], 0), min(lo[ax] + size, a.shape[ax])
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo[ax], s1 - lo[ax]))
    out[tuple(dst)] = a[tuple(src)]
    return out


def classifier_samples(case: Case, rng: np.random.Generator):
    """One crop per labelled node, its mask jittered by a voxel of dilation or erosion."""
    crops, scalars, labels = [], [], []
    objects = ndimage.find_objects(case.nodes)
    for idx, sl in enumerate(objects, start=1):
        if sl is None or idx not in case.malignant:
            continue
        mask = case.nodes == idx
        j = rng.integers(-1, 2)
        if j > 0:
            mask = ndimage.binary_dilation(mask)
        elif j < 0 and mask.sum() > 30:
            eroded = ndimage.binary_erosion(mask)
            mask = eroded if eroded.any() else mask
        centre = ndimage.center_of_mass(mask[sl])
        centre = [c + s.start for c, s in zip(centre, sl, strict=True)]
        extent = max(s.stop - s.start for s in sl)
        crops.append(crop_around(case.image, mask, centre, extent).astype(np.float16))
        sa, la = case.axes_mm[idx]
        scalars.append((sa + rng.normal(0, 0.6), la + rng.normal(0, 0.8)))
        labels.append(case.malignant[idx])
    return crops, scalars, labels
