"""Nodes from a probability map: components on the native grid and their measurements."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference import rules
from inference.classify import crop_around
from inference.findings import AxisLine
from inference.measure import axial_diameters
from inference.necks import Necks, split_component
from inference.preprocess import Grid
from inference.refine import margin_voxels, refine
from inference.volume import Volume


@dataclass
class Candidate:
    mask: np.ndarray  # native bool mask in bbox
    bbox: tuple[int, int, int, int, int, int]
    soft: np.ndarray  # native probability in bbox
    crop: np.ndarray | None = None  # classifier input
    part_of: int = 0  # the component this candidate was split from (`inference.necks`); 0: not split
    working: Working | None = None  # its component's box on the working grid (`components`)


@dataclass(frozen=True)
class Working:
    """A component's box on the working grid: where it starts, the component, the probability."""

    origin: np.ndarray
    component: np.ndarray
    prob: np.ndarray


def components(
    volume: Volume,
    image_w: np.ndarray,
    prob: np.ndarray,
    grid: Grid,
    threshold: float,
    min_volume_mm3: float,
    keep_working: bool = False,
) -> list[Candidate]:
    """Connected components of the working-grid probability, each carried to the native grid.
    With `keep_working`, each keeps its working-grid box (`Candidate.working`), so that it
    can be split at its necks later (`parts_of`)."""
    labels, _ = ndimage.label(prob >= threshold)
    out = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        c = _carried(volume, image_w, prob, grid, threshold, min_volume_mm3, labels, idx, sl)
        if c is None:
            continue
        if keep_working:
            box = _grown(sl, labels.shape)
            c.working = Working(np.array([b.start for b in box]), labels[box] == idx, prob[box].copy())
        out.append(c)
    return out


def parts_of(
    c: Candidate,
    part_of: int,
    necks: Necks,
    volume: Volume,
    image_w: np.ndarray,
    grid: Grid,
    threshold: float,
    min_volume_mm3: float,
) -> list[Candidate]:
    """The parts of a component split at its narrow necks (`inference.necks`), each carried to
    the native grid as the component was, without the voxels of the parts beside it, and
    marked `part_of`; none where it has no neck (or kept no working box, `components`)."""
    if c.working is None:
        return []
    pieces = split_component(c.working.component, necks, grid.working_spacing)
    if len(pieces) < 2:
        return []
    labels = np.zeros(c.working.component.shape, np.int32)
    for n, piece in enumerate(pieces, start=1):
        labels[piece] = n
    out = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        part = _carried(
            volume, image_w, c.working.prob, grid, threshold, min_volume_mm3, labels, idx, sl,
            siblings=True, origin=c.working.origin,
        )  # fmt: skip
        if part is not None:
            part.part_of = part_of
            out.append(part)
    return out


def _grown(sl: tuple[slice, ...], shape: tuple[int, ...], by: int = 2) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - by), min(n, s.stop + by)) for s, n in zip(sl, shape, strict=True))


def _carried(
    volume: Volume,
    image_w: np.ndarray,
    prob: np.ndarray,
    grid: Grid,
    threshold: float,
    min_volume_mm3: float,
    labels: np.ndarray,
    idx: int,
    sl: tuple[slice, ...],
    siblings: bool = False,
    origin: np.ndarray | None = None,
) -> Candidate | None:
    """Component `idx` of `labels` (within `sl`) carried to the native grid; None when it is
    too small or nothing of it is left there. `labels` and `prob` may be a box of the working
    grid that starts at `origin` and reaches 2 voxels beyond the component where the grid
    does. With `siblings`, `labels` holds the parts of one component, and the part does not
    reach into the others."""
    comp = labels[sl] == idx
    if comp.sum() * float(np.prod(grid.working_spacing)) < min_volume_mm3 * 0.5:
        return None
    box_w = _grown(sl, labels.shape)
    own = ndimage.binary_dilation(labels[box_w] == idx, iterations=2)
    if siblings:
        around = labels[box_w]
        own &= (around == 0) | (around == idx)
    local = np.where(own, prob[box_w], 0.0)
    at = np.zeros(3, int) if origin is None else origin
    lo_w = np.array([b.start for b in box_w]) + at  # on the whole working grid
    hi_w = np.array([b.stop for b in box_w]) + at
    lo_n = np.maximum(np.floor(grid.to_native(lo_w)).astype(int), 0)
    hi_n = np.minimum(np.ceil(grid.to_native(hi_w - 1)).astype(int) + 1, volume.shape)
    axes = [np.arange(a, b) for a, b in zip(lo_n, hi_n, strict=True)]
    coords = np.meshgrid(
        *[grid.to_working_axis(ax, a) - lo_w[ax] for ax, a in enumerate(axes)], indexing="ij"
    )
    soft = ndimage.map_coordinates(local, coords, order=1, mode="constant", cval=0.0)
    mask = soft >= threshold
    lab, n = ndimage.label(mask)
    if n == 0:
        return None
    if n > 1:
        sizes = ndimage.sum_labels(mask, lab, range(1, n + 1))
        mask = lab == (int(np.argmax(sizes)) + 1)
    bbox = (int(lo_n[0]), int(lo_n[1]), int(lo_n[2]), int(hi_n[0]), int(hi_n[1]), int(hi_n[2]))
    centre = [c + x.start + a for c, x, a in zip(ndimage.center_of_mass(comp), sl, at, strict=True)]
    extent = max(x.stop - x.start for x in sl)
    crop = crop_around(image_w, labels, centre, extent, label=idx, mask_origin_w=at)
    return Candidate(mask=mask, bbox=bbox, soft=np.where(mask, soft, np.minimum(soft, 0.49)), crop=crop)


def rejoined(candidates: list[Candidate], image_w: np.ndarray, grid: Grid) -> list[Candidate]:
    """The candidates with the kept parts of one split component (`Candidate.part_of`) joined
    again where they touch, in the place of the first of them: the split let each part be
    judged on its own; what is kept of one structure is reported as one. A joined candidate
    gets its classifier crop from its edge; the others are returned as they are."""
    groups: dict[int, list[Candidate]] = {}
    for c in candidates:
        if c.part_of:
            groups.setdefault(c.part_of, []).append(c)
    out: list[Candidate] = []
    for c in candidates:
        parts = groups.get(c.part_of, [c]) if c.part_of else [c]
        if len(parts) == 1:
            out.append(c)
        elif c is parts[0]:
            out.extend(_joined(parts, image_w, grid))
    return out


def _joined(parts: list[Candidate], image_w: np.ndarray, grid: Grid) -> list[Candidate]:
    """The union of `parts`, one candidate per (26-)connected piece of it."""
    lo = np.min([c.bbox[:3] for c in parts], axis=0)
    hi = np.max([c.bbox[3:] for c in parts], axis=0)
    soft = np.zeros(hi - lo, np.float32)
    union = np.zeros(hi - lo, bool)
    for c in parts:
        box = tuple(slice(a - o, b - o) for a, b, o in zip(c.bbox[:3], c.bbox[3:], lo, strict=True))
        soft[box] = np.maximum(soft[box], c.soft)
        union[box] |= c.mask
    lab, n = ndimage.label(union, structure=np.ones((3, 3, 3)))
    out = []
    for sl, piece in zip(ndimage.find_objects(lab), range(1, n + 1), strict=True):
        mask = lab[sl] == piece
        bbox = (
            *(int(a + s.start) for a, s in zip(lo, sl, strict=True)),
            *(int(a + s.stop) for a, s in zip(lo, sl, strict=True)),
        )
        out.append(
            Candidate(
                mask=mask,
                bbox=bbox,  # type: ignore[arg-type]
                soft=np.where(mask, soft[sl], np.minimum(soft[sl], 0.49)),
                crop=working_crop(image_w, grid, mask, bbox),
            )
        )
    return out


def refined(volume: Volume, c: Candidate, grow_mm: float, image_w: np.ndarray, grid: Grid) -> Candidate:
    """`c` with its edge settled on the image (`inference.refine`) and its classifier crop
    made again from that edge; `c` itself where the image gives no edge."""
    margin = margin_voxels(volume.spacing, grow_mm)
    lo = np.maximum(np.array(c.bbox[:3]) - margin, 0)
    hi = np.minimum(np.array(c.bbox[3:]) + margin, volume.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    inner = tuple(slice(a - o, b - o) for a, b, o in zip(c.bbox[:3], c.bbox[3:], lo, strict=True))
    soft = np.zeros(hi - lo, np.float32)
    mask = np.zeros(hi - lo, bool)
    soft[inner], mask[inner] = c.soft, c.mask
    result = refine(volume.array[box], soft, mask, volume.spacing, grow_mm)
    if result is None:
        return c
    soft, mask = result
    tight = ndimage.find_objects(mask.astype(np.uint8))[0]
    tight = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(tight, mask.shape, strict=True)
    )
    start = lo + [s.start for s in tight]
    stop = lo + [s.stop for s in tight]
    bbox = (*(int(v) for v in start), *(int(v) for v in stop))
    mask = mask[tight]
    return Candidate(mask=mask, bbox=bbox, soft=soft[tight], crop=working_crop(image_w, grid, mask, bbox))  # type: ignore[arg-type]


def working_crop(
    image_w: np.ndarray,
    grid: Grid,
    mask: np.ndarray,
    bbox,
    image_origin_w=(0, 0, 0),
    focus: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """The classifier's input for a node given by its native `mask` in `bbox`: the mask
    sampled onto the working grid, where the network's own masks are cropped. `image_w`
    may be a patch of the working image that starts at `image_origin_w`
    (`preprocess.working_patch`). The cube is centred on the mask and scaled to its largest
    side, or, with `focus` (a native (k, j, i) centre and an extent in mm, see
    `node_focus`), centred and scaled there."""
    lo_n, hi_n = np.array(bbox[:3]), np.array(bbox[3:])
    lo_w = np.maximum(np.floor(grid.to_working(lo_n)).astype(int), 0)
    hi_w = np.minimum(np.ceil(grid.to_working(hi_n - 1)).astype(int) + 1, grid.working_shape)
    axes = [np.arange(a, b) for a, b in zip(lo_w, hi_w, strict=True)]
    coords = np.meshgrid(
        *[ax * grid.scale[i] + grid.crop_lo[i] - lo_n[i] for i, ax in enumerate(axes)], indexing="ij"
    )
    mask_w = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant") >= 0.5
    if not mask_w.any():  # a node thinner than a working voxel: its nearest working voxel
        mask_w[tuple(np.clip(np.array(mask_w.shape) // 2, 0, None))] = True
    if focus is None:
        sl = ndimage.find_objects(mask_w.astype(np.uint8))[0]
        centre = np.array(ndimage.center_of_mass(mask_w)) + lo_w
        extent: float = max(x.stop - x.start for x in sl)
    else:
        centre, extent = focus_on_working(grid, focus)
    origin = np.asarray(image_origin_w)
    return crop_around(
        image_w, mask_w.astype(np.float32), centre - origin, extent, mask_origin_w=lo_w - origin
    )


def node_focus(mask: np.ndarray, bbox, key_slice: int, long_mm: float) -> tuple[np.ndarray, float]:
    """Where a crop that shows the node as measured is centred and how far it reaches: the
    centre of the mask on its key slice (native k, j, i) and the long axis (mm). For a lone
    node this is nearly the whole candidate's centre and extent; for a node joined to a vessel
    or a bowel wall it is the node, not the joined whole (the checker's `node` crop)."""
    jj, ii = np.nonzero(mask[key_slice - bbox[0]])
    return np.array([key_slice, bbox[1] + jj.mean(), bbox[2] + ii.mean()]), float(long_mm)


def focus_on_working(grid: Grid, focus: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
    """A `node_focus` on the working grid: its centre (working k, j, i) and extent (voxels)."""
    return grid.to_working(focus[0]), focus[1] / float(np.mean(grid.working_spacing))


def measure_node(volume: Volume, c: Candidate) -> dict | None:
    """Key slice, RECIST diameters, centroid, volume, mean HU and flags of one node."""
    k0, j0, i0, k1, j1, i1 = c.bbox
    vox = float(np.prod(volume.spacing))
    volume_mm3 = float(c.mask.sum()) * vox
    areas = c.mask.sum(axis=(1, 2))
    key_local = int(np.argmax(areas))
    key = k0 + key_local
    try:
        d = axial_diameters(c.soft[key_local], volume.spacing[1:])
    except ValueError:
        return None

    def line(endpoints, length) -> AxisLine:
        jis = [(j0 + r, i0 + q) for r, q in endpoints]
        lps = volume.to_lps(np.array([(key, j, i) for j, i in jis]))
        return AxisLine(
            length_mm=float(length),
            endpoints_lps_mm=tuple(tuple(float(v) for v in p) for p in lps),  # type: ignore[arg-type]
            endpoints_pixel=tuple((float(i) + 0.5, float(j) + 0.5) for j, i in jis),  # type: ignore[arg-type]
        )

    idx = np.argwhere(c.mask) + np.array([k0, j0, i0])
    centroid_voxel = idx.mean(axis=0)
    hu = volume.array[k0:k1, j0:j1, i0:i1]
    dist = ndimage.distance_transform_edt(c.mask, sampling=volume.spacing)
    core = dist >= 0.5 * dist.max()
    flags = rules.shape_flags(
        d.short_mm,
        d.long_mm,
        float(hu[core].mean()) if core.any() else np.nan,
        float(hu[c.mask & ~core].mean()) if (c.mask & ~core).any() else np.nan,
    )
    if rules.touches_edge(c.mask, c.bbox[:3], c.bbox[3:], volume.shape):
        flags = (*flags, rules.FLAG_SCAN_EDGE)
    return {
        "bbox": c.bbox,
        "mask": c.mask,
        "crop": c.crop,
        "key_slice": key,
        "long": line(d.long_endpoints, d.long_mm),
        "short": line(d.short_endpoints, d.short_mm),
        "centroid_voxel": tuple(float(v) for v in centroid_voxel),
        "centroid_lps": tuple(float(v) for v in volume.to_lps(centroid_voxel)),
        "volume_mm3": volume_mm3,
        "mean_hu": float(hu[c.mask].mean()),
        "flags": flags,
    }


def exclusive(candidates: list[Candidate]) -> list[Candidate | None]:
    """The candidates with every voxel owned by at most one of them.

    Two masks can claim the same voxel: each node is carried to the native grid and its
    edge settled on the image on its own.  A contested voxel goes to the candidate with the
    highest probability there (``soft``); a tie goes to the earlier candidate.  A candidate
    that loses voxels keeps its largest connected piece, with its probability at the lost
    voxels capped below 0.5 so that diameters measured on ``soft`` agree with the mask; one
    left with nothing is None.  Candidates that lose nothing are returned as they are.
    """
    lost = [np.zeros(c.mask.shape, dtype=bool) for c in candidates]
    for a, ca in enumerate(candidates):
        for b in range(a + 1, len(candidates)):
            cb = candidates[b]
            lo = np.maximum(ca.bbox[:3], cb.bbox[:3])
            hi = np.minimum(ca.bbox[3:], cb.bbox[3:])
            if np.any(hi <= lo):
                continue
            in_a = tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, ca.bbox[:3], strict=True))
            in_b = tuple(slice(x - o, y - o) for x, y, o in zip(lo, hi, cb.bbox[:3], strict=True))
            both = ca.mask[in_a] & cb.mask[in_b]
            if not both.any():
                continue
            a_wins = ca.soft[in_a] >= cb.soft[in_b]
            lost[a][in_a] |= both & ~a_wins
            lost[b][in_b] |= both & a_wins
    out: list[Candidate | None] = []
    for c, gone in zip(candidates, lost, strict=True):
        if not gone.any():
            out.append(c)
            continue
        mask = c.mask & ~gone
        lab, n = ndimage.label(mask)
        if n == 0:
            out.append(None)
            continue
        if n > 1:
            mask = lab == (int(np.argmax(ndimage.sum_labels(mask, lab, range(1, n + 1)))) + 1)
        soft = np.where(mask, c.soft, np.minimum(c.soft, 0.49))
        out.append(Candidate(mask=mask, bbox=c.bbox, soft=soft, crop=c.crop))
    return out
