"""One reconstruction of each scan: a CT scanner sends one acquisition as several series
(thin and thick slices, soft-tissue and lung kernels, original and derived); nodal analyses
one of them, so that a study gets one set of results per scan, not several that disagree.

Two series are reconstructions of one scan when they share a Frame of Reference UID, the
spans of their instances' acquisition times overlap, and they cover the same stretch of the
body: the overlap of their slices' spans along the slice normal is at least `SAME_REGION`
of the shorter span. All three must be known: phases of one session (arterial, venous)
share the frame of reference but not the acquisition time; regions reconstructed apart from
one spiral (neck and chest, chest and abdomen) share both but not the stretch of body; and a
series that does not say when or where it was acquired (a multi-frame one: its positions
are per frame) is never grouped with another one.

Of one scan's reconstructions, `choose` keeps, in this order: an ORIGINAL image before a
DERIVED one; slices up to `thin_mm` thick before thicker ones (or of unknown thickness):
the model misses small nodes on thick slices; a soft-tissue kernel before a sharp one
(lung, bone: a kernel matching a `sharp_kernels` pattern, or, where the series names no
kernel, a description matching one); the thinnest slices; the most slices; then the Series
Instance UID, so the choice never depends on arrival order.

Pure functions of series summaries; `completion.quiet` applies them to a study's series.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: the share of the shorter series' span along the slice normal that two reconstructions of
#: one scan have in common (at least)
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


def same_scan(a: Reconstruction, b: Reconstruction) -> bool:
    if not a.frame_of_reference_uid or a.frame_of_reference_uid != b.frame_of_reference_uid:
        return False
    if a.acquired is None or b.acquired is None or a.extent is None or b.extent is None:
        return False
    if not (a.acquired[0] <= b.acquired[1] and b.acquired[0] <= a.acquired[1]):
        return False
    common = min(a.extent[1], b.extent[1]) - max(a.extent[0], b.extent[0])
    shorter = min(a.extent[1] - a.extent[0], b.extent[1] - b.extent[0])
    return common >= SAME_REGION * shorter


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
    """For each series, the reconstruction of its scan to analyse (the series itself when it
    is that one, or when no other series reconstructs its scan). Scans are the groups that
    `same_scan` joins, transitively."""
    parent = {r.series_uid: r.series_uid for r in series}  # union-find over series UIDs

    def root(uid: str) -> str:
        while parent[uid] != uid:
            uid = parent[uid]
        return uid

    for i, a in enumerate(series):
        for b in series[i + 1 :]:
            ra, rb = root(a.series_uid), root(b.series_uid)
            if ra != rb and same_scan(a, b):
                parent[rb] = ra
    groups: dict[str, list[Reconstruction]] = {}
    for r in series:
        groups.setdefault(root(r.series_uid), []).append(r)
    chosen: dict[str, Reconstruction] = {}
    for members in groups.values():
        best = min(members, key=lambda r: _preference(r, sharp_kernels, thin_mm))
        chosen.update((r.series_uid, best) for r in members)
    return chosen
