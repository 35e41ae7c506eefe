"""Crop networks: a small 3D CNN on a crop around a node (CT and mask) with its axes.

Two of them: the malignancy classifier, and the checker (`inference.train_checker`) that
says whether a candidate is a node at all."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from inference.networks import classifier_scalars
from inference.preprocess import normalise

CROP = 32  # voxels on each side of the classifier's input cube
MIN_FIELD = 32  # the cube covers at least this many working voxels (mm at 1 mm spacing)
#: What the checker's crop is centred on and scaled to (card `checker.crop`): "candidate",
#: the whole candidate (its centre of mass and largest side), as the classifier's crop; "node",
#: the node as measured (`inference.nodes.node_focus`: its key slice's centre and its long
#: axis), so that a node joined to a vessel fills the crop as a lone node does; "both", the
#: two crops stacked (the candidate's CT and mask, then the node's).
CROP_KINDS = ("candidate", "node", "both")


def crop_channels(kind: str) -> int:
    """The input channels of a checker whose crop is `kind` (CT and mask per crop)."""
    return 4 if kind == "both" else 2


#: The eight mirror images of a (batch, channel, z, y, x) crop: the axes each one flips.
FLIP_DIMS = tuple(dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n))


def crop_around(
    image_hu_w: np.ndarray,
    mask_w: np.ndarray,
    centre_w,
    extent_w: float,
    label: int | None = None,
    mask_origin_w=(0, 0, 0),
) -> np.ndarray:
    """(2, CROP, CROP, CROP): normalised CT and node mask in a cube 1.4x the node's extent.

    The cube is scaled to the node so that small and large nodes fill the input alike; the
    classifier gets the node's size from the measurements it is given beside the crop.
    `mask_w` may cover only a box of the working grid that starts at `mask_origin_w`.
    """
    field = int(max(MIN_FIELD, np.ceil(1.4 * extent_w)))
    image = _box(image_hu_w, centre_w, field, -1000.0)
    mask = _box(mask_w, np.asarray(centre_w, float) - np.asarray(mask_origin_w), field, 0.0)
    if label is not None:  # mask_w is a label map
        mask = (mask == label).astype(np.float32)
    both = torch.from_numpy(np.stack([normalise(image), mask]))[None]
    if field != CROP:
        both = F.interpolate(both, size=(CROP,) * 3, mode="trilinear", align_corners=False)
    return both[0].numpy()


def _box(a: np.ndarray, centre, size: int, fill: float) -> np.ndarray:
    out = np.full((size,) * 3, fill, dtype=np.float32)  # also for bool or label input
    lo = np.rint(np.asarray(centre)).astype(int) - size // 2
    src, dst = [], []
    for ax in range(3):
        s0, s1 = max(lo[ax], 0), min(lo[ax] + size, a.shape[ax])
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo[ax], s1 - lo[ax]))
    out[tuple(dst)] = a[tuple(src)]
    return out


def crop_probabilities(
    classifier: torch.nn.Module,
    crops: list[np.ndarray],
    axes_mm: list[tuple[float, float]],
    device: torch.device,
    flips: bool = False,
) -> list[float]:
    """The network's probability for each crop with its (short, long) axis in mm: malignancy
    for the classifier, "a node" for the checker. With `flips`, the logit is averaged over
    the crop's eight mirror images (the networks are trained with random flips)."""
    if not crops:
        return []
    x = torch.from_numpy(np.stack(crops)).to(device)
    s = torch.tensor([classifier_scalars(sa, la) for sa, la in axes_mm], dtype=torch.float32, device=device)
    views = FLIP_DIMS if flips else ((),)
    with torch.inference_mode():
        logits = torch.stack([classifier(x.flip(dims) if dims else x, s).float() for dims in views])
        p = torch.sigmoid(logits.mean(0))
    return [float(v) for v in p.cpu()]
