"""One reconstruction of each scan: a CT scanner sends one acquisition as several series
(thin and thick slices, soft-tissue and lung kernels, original and derived); nodal analyses
one of them, so that a study gets one set of results per scan, not several that disagree.

A series is answered for by another (`covers`) when they share a Frame of Reference UID,
the spans of their instances' acquisition times overlap, and the other's slices span at
least `SAME_REGION` of its own along the slice normal. All three must be known: phases of
one session (arterial, venous) share the frame of reference but not the acquisition time;
regions reconstructed apart from one spiral (neck and chest, chest and abdomen) share both
but not the stretch of body; a partial reconstruction (the chest of a chest-abdomen scan)
never answers for the whole; and a series that does not say when or where it was acquired
is answered for by no other. A multi-frame (Enhanced CT) series says where by its frames'
positions (`spool.header`), and when by its Acquisition DateTime.

`choose` takes the series in this order of preference, each analysed unless one taken
before covers it: an ORIGINAL image before a DERIVED one; slices up to `thin_mm` thick
before thicker ones (or of unknown thickness): the model misses small nodes on thick
slices; a soft-tissue kernel before a sharp one (lung, bone: a kernel matching a
`sharp_kernels` pattern, or, where the series names no kernel, a description matching one);
the thinnest slices; the most slices; then the Series Instance UID, so the choice never
depends on arrival order.

Pure functions of series summaries; `completion.quiet` applies them to a study's series.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: the share of a series' span along the slice normal that a reconstruction answering for
#: it must cover (at least)
SAME_REGION = 0.8


@dataclass(frozen=True)
class Reconstruction:
    series_uid: str
    frame_of_reference_uid: str | None
    acquired: tuple[float, float] | None  # first and last acquisition time of its instances, s
    extent: tuple[float, float] | None  # first and last slice position along the normal, mm
    image_type: tuple[str, ...]
    kernel: str
    description: str
    slice_thickness_mm: float | None
    slices: int

    def label(self) -> str:
        """How a reason names the series: description, thickness and kernel where known."""
        parts = [f"'{self.description}'" if self.description else "no description"]
        if self.slice_thickness_mm is not None:
            parts.append(f"{self.slice_thickness_mm:g} mm")
        if self.kernel:
            parts.append(f"kernel {self.kernel}")
        return f"series {self.series_uid} ({', '.join(parts)})"


def covers(chosen: Reconstruction, other: Reconstruction) -> bool:
    """Whether analysing `chosen` answers for `other`: one frame of reference, overlapping
    acquisition times, and `chosen`'s slices span at least `SAME_REGION` of `other`'s
    (a reconstruction of part of the scan, say the chest, never answers for the whole)."""
    if not chosen.frame_of_reference_uid or chosen.frame_of_reference_uid != other.frame_of_reference_uid:
        return False
    if chosen.acquired is None or other.acquired is None or chosen.extent is None or other.extent is None:
        return False
    if not (chosen.acquired[0] <= other.acquired[1] and other.acquired[0] <= chosen.acquired[1]):
        return False
    length = other.extent[1] - other.extent[0]
    if not (math.isfinite(length) and length > 0):
        return False  # one slice position, or none that makes sense: where it lies is unknown
    common = min(chosen.extent[1], other.extent[1]) - max(chosen.extent[0], other.extent[0])
    return common >= SAME_REGION * length


def is_sharp(r: Reconstruction, sharp_kernels: Iterable[str]) -> bool:
    """A sharp kernel by its name, or by the series description where it names no kernel
    (a description names the protocol as often as the kernel: "Lung staging")."""
    text = r.kernel or r.description
    return bool(text) and any(re.search(p, text) for p in sharp_kernels)


def _preference(r: Reconstruction, sharp_kernels: list[str], thin_mm: float) -> tuple:
    thickness = r.slice_thickness_mm
    return (
        "DERIVED" in r.image_type,
        thickness is None or thickness > thin_mm,
        is_sharp(r, sharp_kernels),
        thickness is None,
        thickness or 0.0,
        -r.slices,
        r.series_uid,
    )


def choose(
    series: list[Reconstruction], sharp_kernels: list[str], thin_mm: float
) -> dict[str, Reconstruction]:
    """For each series, the reconstruction analysed for it: the series itself, or one
    preferred to it that `covers` it. Taken in order of preference, a series is analysed
    unless a series already taken covers it, so nothing of the body goes unanalysed: a thin
    reconstruction of the chest beside a thick one of chest and abdomen leaves both
    analysed."""
    taken: list[Reconstruction] = []
    chosen: dict[str, Reconstruction] = {}
    for r in sorted(series, key=lambda r: _preference(r, sharp_kernels, thin_mm)):
        by = next((t for t in taken if covers(t, r)), None)
        if by is None:
            taken.append(r)
        chosen[r.series_uid] = by or r
    return chosen
