"""The node's boundary, settled on the CT image itself.

The network's mask is drawn on the working grid and carried to the native grid: its edge
lies up to a working voxel off the node's edge, mostly inside it (the measured short
axis came out 0.6-0.8 mm short on the phantoms). A lymph node is soft tissue in fat, and
on CT its edge is where the density is half-way between the two, as a reader sees it
with a soft-tissue window. `refine` moves the edge there:

1. the node's density is the median HU inside the network's mask, the fat's the median
   in a shell 2-4 mm outside it;
2. within `grow_mm` of the mask (in or out), each voxel's membership is how close its HU
   (lightly blurred in plane) is to the node's density, on the scale node - fat: 1 at
   the node's density, 0.5 half-way to fat (or as far above the node: an enhanced
   vessel or bone beside the node stays out), 0 at fat. Where a structure denser than
   fat (an organ, a vessel, another node) lies beyond that band, the node grows only on
   its own side of the contact: a watershed on the distance map, seeded by the mask and
   by that structure, cuts at the neck between them;
3. deeper inside the mask the network's verdict stands, holes in each slice are filled
   and fat inside the node's convex outline is taken in, so that a necrotic centre or a
   fatty hilum (a notch of fat at the node's margin) remains part of the node, as it is
   in the reader's outline and in the training labels.

The result is a membership map whose 0.5 level is the refined edge: the mask, and the
soft map the RECIST diameters are measured on. Where the surroundings are no fat (no
contrast between node and shell), the network's mask is kept as it is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

SHELL_MM = (2.0, 4.0)  # where the surrounding fat's density is taken
IN_PLANE_BLUR_PX = 0.5
MIN_CONTRAST_HU = 40.0  # node minus surroundings below this: keep the network's mask
KEEP_DEPTH_MM = 2.0  # deeper inside the network's mask than this, the mask stands
HILUM_MAX_SHARE = 0.35  # a fat notch larger than this share of the slice's node is no hilum
FILLED = 0.75  # membership given to a filled hole or hilum (inside the 0.5 edge)


def margin_voxels(spacing: tuple[float, float, float], grow_mm: float) -> np.ndarray:
    """Voxels to add around a node's box so that `refine` sees its shell and band."""
    reach = max(grow_mm, SHELL_MM[1]) + 1.0
    return np.ceil(reach / np.asarray(spacing, float)).astype(int)


def refine(
    hu: np.ndarray, soft: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], grow_mm: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """(membership, mask) of one node in the box `hu` covers (`soft`, `mask`: the network's,
    same box), or None where the image gives no edge to settle on."""
    if grow_mm <= 0 or not mask.any():
        return None
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    shell = (outside > SHELL_MM[0]) & (outside <= SHELL_MM[1])
    if shell.sum() < 10:
        return None
    image = ndimage.gaussian_filter(hu.astype(np.float32), (0, IN_PLANE_BLUR_PX, IN_PLANE_BLUR_PX))
    node_hu = float(np.median(image[mask]))
    fat_hu = float(np.median(image[shell]))
    contrast = node_hu - fat_hu
    if contrast < MIN_CONTRAST_HU:
        return None
    membership = np.clip(1.0 - np.abs(image - node_hu) / contrast, 0.0, 1.0)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    band = (
        (outside <= grow_mm)
        & (inside <= KEEP_DEPTH_MM)
        & _own(image > fat_hu + contrast / 2, mask, outside, grow_mm, spacing)
    )
    deep = mask & ~band
    out = np.where(band, membership, 0.0)
    out[deep] = np.maximum(soft[deep], 0.5)
    refined = out >= 0.5
    filled = np.stack([_closed(s, f) for s, f in zip(refined, image < node_hu - contrast / 2, strict=True)])
    out[filled & ~refined] = FILLED
    lab, n = ndimage.label(filled)
    if n == 0:
        return None
    if n > 1:  # the piece that holds most of the network's mask
        keep = int(np.argmax(ndimage.sum_labels(mask, lab, range(1, n + 1)))) + 1
        filled = lab == keep
    out = np.where(filled, np.maximum(out, 0.5), np.minimum(out, 0.49))
    return out.astype(np.float32), filled


def _own(
    tissue: np.ndarray,
    mask: np.ndarray,
    outside: np.ndarray,
    grow_mm: float,
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """Where the node may grow: the node's side of the neck between it and a neighbouring
    structure denser than fat (an organ, a vessel, another node) that the box shows beyond
    the band (`tissue`: above half-way between fat and node). A marker-controlled
    watershed on the distance map (scikit-image), seeded by the network's mask and by that
    neighbour's tissue, cuts at the neck between them, as in `inference.followup.look`.
    Everywhere when no such neighbour is in view."""
    other = tissue & (outside > grow_mm)
    if not other.any():
        return np.ones(mask.shape, dtype=bool)
    region = tissue | mask
    seeds = np.where(mask, 1, np.where(other, 2, 0)).astype(np.int32)
    distance = ndimage.distance_transform_edt(region, sampling=spacing)
    return watershed(-distance, seeds, mask=region) != 2


def _closed(node: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """One slice of the node with its holes filled and a fatty hilum taken in: fat inside
    the node's convex outline (a notch), up to `HILUM_MAX_SHARE` of the node's area."""
    node = ndimage.binary_fill_holes(node)
    if node.sum() < 9:
        return node
    notch = ndimage.binary_opening(convex_hull_image(node) & ~node & fat)  # no rim slivers
    if 0 < notch.sum() <= HILUM_MAX_SHARE * node.sum():
        node = node | notch
    return node
