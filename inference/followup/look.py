"""A look at a node's place in the study where the model did not find it.

A radiologist who cannot find last time's node on today's CT looks where it was; one who
sees a "new" node looks whether it was already there. This module does the same for a
node of one study without a partner in the other: at its registered place it separates
the soft tissue there from the fat around it and measures it as the analysis measures a
node (`inference.measure`, RECIST diameters on the axial slice of largest area).

The answer (`Look.outcome`) is one of:

* `FAT`: the place holds no soft tissue (the core of where the node was or is, mapped
  through the registration, is mostly below `FollowUpSettings.soft_tissue_hu`): the node
  is truly absent there;
* `MEASURED`: one soft-tissue structure sits there, apart from its surroundings, and its
  short axis, long axis and volume are given. Where it reaches the edge of the scan it is
  measured in part (`Look.at_scan_edge`, `rules.FLAG_SCAN_EDGE`), as a node of the model's
  own would be;
* `LOOK_ALIKE`: one soft-tissue structure sits there, but the model's checker (a CNN on its
  crop, `inference.train_checker`) takes it for a look-alike, as it would drop it among the
  model's own candidates (only with a `Judge`, which `compare` gets from a model that has a
  checker): no node there, as with `FAT`. A look should not find again a false positive
  that the model refused in this study;
* `UNCLEAR`: soft tissue is there but cannot be taken for one node: what the separation
  leaves is a tube (a bowel loop, a vessel), or far larger than the node was (a
  conglomerate, an organ), or its short axis is more than twice the node's (not taken for
  the same node); or the place lies outside the scan. Not a size: for the
  response such a node is not evaluable.

The separation is a marker-controlled watershed on the distance map of the soft tissue
(scikit-image), seeded at the place and at the soft tissue on the faces of a box around it:
a node pressed against an organ, a vessel or another node is cut at the neck between them,
as a reader's eye separates them by their shapes.

Pure: NumPy, SciPy, `inference.measure` and `inference.rules`; no network, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from inference import rules
from inference.findings import Point3, rounded
from inference.measure import axial_diameters
from inference.volume import Volume

FAT, MEASURED, UNCLEAR, LOOK_ALIKE = "fat", "measured", "unclear", "look-alike"
#: Whether a structure the look measured is a node as the model judges its own candidates:
#: (volume, structure mask, the mask's origin (k, j, i) in the volume, short axis mm, long
#: axis mm) -> keep it (`inference.pipeline.checker_keeps`).
Judge = Callable[[Volume, np.ndarray, tuple[int, int, int], float, float], bool]
SOFT_TISSUE_MAX_HU = 150.0  # above: contrast-filled vessel, oral contrast, bone (not a node)
BOX_MIN_MM = 20.0  # the look's box reaches at least this far from the place
BOX_LONG_AXIS_FACTOR = 1.5  # ... and this many expected long axes (room for growth)
CORE_SA_FACTOR = 0.2  # the core: a ball of this many expected short axes (at least CORE_MIN_MM)
CORE_MIN_MM = 2.0
CORE_MIN_SOFT_SHARE = 0.5  # less soft tissue in the core: FAT
MAX_NECK_SHARE = 0.8  # a neck this thick (share of the node's own thickness): no separation
MAX_ELONGATION = 3.5  # 3D principal spread ratio above this: a tube (the plausibility's limit)
MAX_VOLUME_GROWTH = 15.0  # volume above this many times the expected ellipsoid's: not one node
#: a short axis more than this many times the node's: not the same node (the look searches
#: a box sized for the node it expects, and a structure that much larger is something else,
#: or a node the box cannot hold); either way unclear, not a size
MAX_SHORT_AXIS_RATIO = 2.0
SMOOTH_MM = 0.7  # in-plane Gaussian before thresholding (noise)


@dataclass(frozen=True)
class Look:
    """What the look found at a node's place (see the module's outcomes)."""

    outcome: str  # FAT | MEASURED | UNCLEAR | LOOK_ALIKE
    short_axis_mm: float | None = None
    long_axis_mm: float | None = None
    volume_mm3: float | None = None
    soft_tissue_share: float | None = None  # of the core, above the soft-tissue threshold
    note: str = ""
    #: MEASURED: the structure reaches the edge of the scan, so it is measured in part
    at_scan_edge: bool = False
    #: MEASURED: the structure's voxels in a box of the volume that starts at `origin` (k, j, i)
    structure: np.ndarray | None = field(default=None, compare=False, repr=False)
    origin: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome,
            "short_axis_mm": rounded(self.short_axis_mm, 2),
            "long_axis_mm": rounded(self.long_axis_mm, 2),
            "volume_mm3": rounded(self.volume_mm3, 1),
            "soft_tissue_share": rounded(self.soft_tissue_share, 3),
            "note": self.note,
            "at_scan_edge": self.at_scan_edge,
        }


def look_at(
    volume: Volume,
    place_lps_mm: Point3,
    expected_short_axis_mm: float,
    expected_long_axis_mm: float,
    soft_tissue_hu: float = -30.0,
) -> Look:
    """Look at `place_lps_mm` of `volume` for a node of about the expected axes."""
    spacing = np.asarray(volume.spacing, dtype=float)
    centre = np.linalg.solve(volume.affine[:3, :3], np.asarray(place_lps_mm, float) - volume.affine[:3, 3])
    shape = np.asarray(volume.shape)
    if np.any(centre < -0.5) or np.any(centre > shape - 0.5):
        return Look(UNCLEAR, note="the place lies outside the scan")
    reach = max(BOX_MIN_MM, BOX_LONG_AXIS_FACTOR * max(expected_long_axis_mm, expected_short_axis_mm))
    half = np.ceil(reach / spacing).astype(int)
    c = np.rint(centre).astype(int)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    hu = np.asarray(volume.array[box], dtype=np.float32)
    hu = ndimage.gaussian_filter(hu, (0.0, SMOOTH_MM / spacing[1], SMOOTH_MM / spacing[2]))
    soft = _filled((hu > soft_tissue_hu) & (hu < SOFT_TISSUE_MAX_HU))

    local = centre - lo
    grid = np.indices(hu.shape, dtype=np.float32)
    dist_mm = np.sqrt(sum(((grid[a] - local[a]) * spacing[a]) ** 2 for a in range(3)))
    core = dist_mm <= max(CORE_MIN_MM, CORE_SA_FACTOR * expected_short_axis_mm)
    if not core.any():  # a core smaller than a voxel: the voxel at the place
        core[tuple(np.clip(np.rint(local).astype(int), 0, np.asarray(hu.shape) - 1))] = True
    share = float(soft[core].mean())
    if share < CORE_MIN_SOFT_SHARE:
        return Look(FAT, soft_tissue_share=share, note="no soft tissue at the place")

    inside = [(a > 0, b < n) for a, b, n in zip(lo, hi, shape, strict=True)]
    separated = _separated(soft, core, spacing, inside)
    if separated is None:
        return Look(UNCLEAR, soft_tissue_share=share, note="no structure at the place")
    node, neck = separated
    why = _not_a_node(node, neck, spacing, expected_short_axis_mm, expected_long_axis_mm)
    if why:
        return Look(UNCLEAR, soft_tissue_share=share, note=why)
    cut = rules.touches_edge(node, lo, hi, shape)
    areas = node.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    try:
        d = axial_diameters(node[key].astype(np.float32), (float(spacing[1]), float(spacing[2])))
    except ValueError:
        return Look(UNCLEAR, soft_tissue_share=share, note="the structure there cannot be measured")
    if d.short_mm > MAX_SHORT_AXIS_RATIO * expected_short_axis_mm:
        return Look(
            UNCLEAR,
            soft_tissue_share=share,
            note=(
                f"the structure there ({d.short_mm:.1f} mm short axis) is more than twice the node's "
                f"{expected_short_axis_mm:.1f} mm: not taken for the same node"
            ),
        )
    return Look(
        MEASURED,
        short_axis_mm=float(d.short_mm),
        long_axis_mm=float(d.long_mm),
        volume_mm3=float(node.sum() * np.prod(spacing)),
        soft_tissue_share=share,
        note=rules.FLAG_SCAN_EDGE if cut else "",
        at_scan_edge=cut,
        structure=node,
        origin=(int(lo[0]), int(lo[1]), int(lo[2])),
    )


def judged(look: Look, volume: Volume, judge: Judge | None) -> Look:
    """`look`, or a `LOOK_ALIKE` where `judge` refuses the structure it measured."""
    if judge is None or look.outcome != MEASURED or look.structure is None or look.origin is None:
        return look
    sa, la = float(look.short_axis_mm or 0.0), float(look.long_axis_mm or 0.0)
    if judge(volume, look.structure, look.origin, sa, la):
        return look
    return Look(
        LOOK_ALIKE,
        soft_tissue_share=look.soft_tissue_share,
        note=(
            f"soft tissue there ({sa:.1f} mm short axis), but the model's checker takes it for a "
            "look-alike, not a node"
        ),
    )


def _separated(
    soft: np.ndarray, core: np.ndarray, spacing: np.ndarray, inside: list[tuple[bool, bool]]
) -> tuple[np.ndarray, float] | None:
    """The soft tissue at the place, apart from what touches it: a marker-controlled
    watershed on the distance to the nearest non-soft voxel, seeded by the core and by the
    soft tissue on the box faces that the scan continues beyond, so that a node pressed
    against an organ, a vessel or another node is cut at the neck between them. Returns the
    node and how thick its neck is, as a share of its own thickness (0: it stands alone)."""
    filled = soft
    seeds = np.zeros(soft.shape, dtype=np.int32)
    outer = np.zeros(soft.shape, dtype=bool)
    for axis, (low_inside, high_inside) in enumerate(inside):
        for index, is_inside in ((0, low_inside), (soft.shape[axis] - 1, high_inside)):
            if is_inside:
                face = [slice(None)] * 3
                face[axis] = slice(index, index + 1)
                outer[tuple(face)] = True
    seeds[outer & filled] = 2
    seeds[core & filled] = 1
    if not (seeds == 1).any():
        return None
    distance = ndimage.distance_transform_edt(filled, sampling=spacing)
    labels = watershed(-distance, seeds, mask=filled)
    node = labels == 1
    if not node.any():
        return None
    # the neck: the thickest place where the node meets what was cut off; as thick as the
    # node itself, nothing narrows between them: one structure running on (a tube)
    touching = node & ndimage.binary_dilation(labels == 2)
    neck = float(distance[touching].max()) if touching.any() else 0.0
    return node, neck / float(distance[node].max())


def _not_a_node(node: np.ndarray, neck: float, spacing: np.ndarray, short_mm: float, long_mm: float) -> str:
    """Why the separated structure cannot be taken as the node ("" when it can)."""
    if neck > MAX_NECK_SHARE:
        return "the soft tissue there continues without a neck: not separable from what surrounds it"
    points = np.argwhere(node) * spacing
    if len(points) < 4:
        return "the structure there is too small to measure"
    spread = np.sqrt(np.maximum(np.linalg.eigvalsh(np.cov(points.T)), 1e-6))
    if spread[-1] / spread[0] > MAX_ELONGATION:
        return (
            "the soft tissue there is a tube, not a node (a vessel, bowel or a ureter continues through it)"
        )
    expected = 4.0 / 3.0 * np.pi * (short_mm / 2) ** 2 * (max(long_mm, short_mm) / 2)
    if node.sum() * np.prod(spacing) > MAX_VOLUME_GROWTH * max(expected, 1.0):
        return "the soft tissue there is far larger than the node was: not separable from what surrounds it"
    return ""


def _filled(mask: np.ndarray) -> np.ndarray:
    """Holes closed on each axial slice (a fatty hilum, a necrotic core below the threshold)."""
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])
