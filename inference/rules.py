"""The rule-based baseline reported beside the network's probability.

Size classes follow RECIST 1.1 for lymph nodes (short axis); shape and necrosis flags
follow Steinkamp et al. 1994 (round: short/long >= 0.8 here) and Som 1992 (central
necrosis). See docs/model.md.
"""

from __future__ import annotations

import numpy as np

SIZE_NORMAL = "normal (<10 mm)"
SIZE_NON_TARGET = "pathological non-target (10-15 mm)"
SIZE_TARGET = "pathological target (>=15 mm)"
SIZE_CATEGORIES = (SIZE_NORMAL, SIZE_NON_TARGET, SIZE_TARGET)
FLAG_ROUND = "round"
FLAG_NECROSIS = "central low attenuation"
#: the node reaches the edge of the scanned volume (its first or last slice, row or column):
#: part of it may lie outside, so it cannot be measured whole. RECIST 1.1 takes as targets
#: only lesions "suitable for accurate repeated measurements" (docs/follow-up-criteria.md)
FLAG_SCAN_EDGE = "cut by the edge of the scan"
#: how a result says a node's size is that of its part in the scan (SR comments and summary)
SCAN_EDGE_REMARK = f"{FLAG_SCAN_EDGE}, measured in part"


def slice_remarks(
    spacing_mm: float, limit_mm: float | None, thickness_mm: float | None = None
) -> tuple[str, ...]:
    """The remarks a CT's slices call for: `thick_slices_remark` when they lie further apart
    than `limit_mm` (the card's `limits.max_slice_spacing_mm`; None: no limit), or are
    thicker than it (Slice Thickness; None: unknown), naming the larger of the two. The
    limit was measured on CT whose slices are as thick as they are apart, so either
    exceeding it blurs small nodes."""
    if limit_mm is None:
        return ()
    if thickness_mm is not None and thickness_mm > max(spacing_mm, limit_mm) + 0.01:
        return (thick_slices_remark(thickness_mm, limit_mm, "thick"),)
    if spacing_mm > limit_mm + 0.01:
        return (thick_slices_remark(spacing_mm, limit_mm),)
    return ()


def thick_slices_remark(mm: float, limit_mm: float, how: str = "apart") -> str:
    """How a result says that its CT's slices lie further apart (or are thicker, `how`
    "thick") than its model finds small nodes reliably on (the card's
    `limits.max_slice_spacing_mm`; ASCII, for the images)."""
    value = f"{mm:.1f}" if round(mm, 1) > limit_mm else f"{mm:.2f}"  # never "2.5, over 2.5"
    return f"thick slices ({value} mm {how}, over {limit_mm:g}): small nodes may be missed"


def size_category(short_axis_mm: float) -> str:
    if short_axis_mm >= 15.0:
        return SIZE_TARGET
    if short_axis_mm >= 10.0:
        return SIZE_NON_TARGET
    return SIZE_NORMAL


def shape_flags(short_axis_mm: float, long_axis_mm: float, core_hu: float, rim_hu: float) -> tuple[str, ...]:
    flags = []
    if long_axis_mm > 0 and short_axis_mm / long_axis_mm >= 0.8:
        flags.append(FLAG_ROUND)
    if short_axis_mm >= 8.0 and np.isfinite(core_hu) and core_hu < rim_hu - 15.0:
        flags.append(FLAG_NECROSIS)
    return tuple(flags)


def touches_edge(mask: np.ndarray, lo, hi, shape) -> bool:
    """Whether `mask`, the box [lo, hi) of a volume of `shape`, reaches the volume's edge:
    its first or last slice, row or column."""
    for axis in range(3):
        if lo[axis] == 0 and mask.take(0, axis=axis).any():
            return True
        if hi[axis] == shape[axis] and mask.take(-1, axis=axis).any():
            return True
    return False
