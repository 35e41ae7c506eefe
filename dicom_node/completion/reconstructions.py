"""One reconstruction of each scan: a CT scanner sends one acquisition as several series
(thin and thick slices, soft-tissue and lung kernels, original and derived); nodal analyses
one of them, so that a study gets one set of results per scan, not several that disagree.

Two series are reconstructions of one scan when they share a Frame of Reference UID and the
spans of their instances' acquisition times overlap. Both must be known: phases of one
session (arterial, venous) share the frame of reference but not the acquisition time, and a
series that does not say when it was acquired is never grouped with another one.

Of one scan's reconstructions, `choose` keeps, in this order: an ORIGINAL image before a
DERIVED one; a kernel or description that matches no `sharp_kernels` pattern (lung, bone)
before one that does; the thinnest slices (unknown thickness last); the most slices; then
the Series Instance UID, so the choice never depends on arrival order.

Pure functions of series summaries; `completion.quiet` applies them to a study's series.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Reconstruction:
    series_uid: str
    frame_of_reference_uid: str | None
    acquired: tuple[float, float] | None  # first and last acquisition time of its instances, s
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
    if a.acquired is None or b.acquired is None:
        return False
    return a.acquired[0] <= b.acquired[1] and b.acquired[0] <= a.acquired[1]


def is_sharp(r: Reconstruction, sharp_kernels: Iterable[str]) -> bool:
    return any(re.search(p, text) for p in sharp_kernels for text in (r.kernel, r.description) if text)


def _preference(r: Reconstruction, sharp_kernels: list[str]) -> tuple:
    return (
        "DERIVED" in r.image_type,
        is_sharp(r, sharp_kernels),
        r.slice_thickness_mm is None,
        r.slice_thickness_mm or 0.0,
        -r.slices,
        r.series_uid,
    )


def choose(series: list[Reconstruction], sharp_kernels: list[str]) -> dict[str, Reconstruction]:
    """For each series, the reconstruction of its scan to analyse (the series itself when it
    is that one, or when no other series reconstructs its scan). Scans are the groups that
    `same_scan` joins, transitively."""
    group_of = {r.series_uid: i for i, r in enumerate(series)}

    def root(uid: str) -> str:
        while series[group_of[uid]].series_uid != uid:
            uid = series[group_of[uid]].series_uid
        return uid

    for i, a in enumerate(series):
        for b in series[i + 1 :]:
            ra, rb = root(a.series_uid), root(b.series_uid)
            if ra != rb and same_scan(a, b):
                group_of[rb] = group_of[ra]
    groups: dict[str, list[Reconstruction]] = {}
    for r in series:
        groups.setdefault(root(r.series_uid), []).append(r)
    chosen: dict[str, Reconstruction] = {}
    for members in groups.values():
        best = min(members, key=lambda r: _preference(r, sharp_kernels))
        chosen.update((r.series_uid, best) for r in members)
    return chosen
