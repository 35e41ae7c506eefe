"""Result images of a follow-up: the prior slice beside the current one, per changed node.

A node changed when its short axis moved by at least `CHANGED_MM` or `CHANGED_PERCENT`, or
when it is new or gone. The left half is the prior CT's axial slice through the prior node
(for a new node: where the registration puts it in the prior), circled, with the prior's
date and size; the right half is the current key image of the node as the result images
draw it (for a gone node: the current slice where the prior node would be, circled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from inference.findings import StudyFindings
from inference.followup import GONE, MATCHED, NEW, Comparison, NodeChange
from inference.followup.look import UNCLEAR
from inference.volume import Volume
from sr_templates import result_images as ri
from sr_templates.followup import hidden_then
from sr_templates.sources import SourceSeries

CHANGED_MM = 2.0
CHANGED_PERCENT = 10.0
PRIOR_COLOUR = (0, 200, 255)
GAP_PX = 6


def changed(n: NodeChange) -> bool:
    if n.status in (NEW, GONE):
        return True
    mm, pct = n.short_axis_change_mm, n.short_axis_change_percent
    return n.status == MATCHED and (
        (mm is not None and abs(mm) >= CHANGED_MM) or (pct is not None and abs(pct) >= CHANGED_PERCENT)
    )


def gone_text(n: NodeChange, remarks: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Title and lines of the current panel of a prior node the model did not find now, with
    the current study's `remarks` last (`StudyFindings.remarks`: slices too far apart for
    small nodes, as on the key images)."""
    was = f"was short {n.short_axis_mm_prior:.1f} mm"
    if n.short_axis_mm_current is not None:
        return (
            f"CURRENT - {n.prior_label} NOT FOUND BY THE MODEL",
            [
                f"{n.prior_label}: measured at its place: short {n.short_axis_mm_current:.1f} mm ({was})",
                *_cut(n.prior_label, n.look is not None and n.look.at_scan_edge),
                *remarks,
            ],
        )
    if n.look is not None and n.look.outcome == UNCLEAR:
        return (
            f"CURRENT - {n.prior_label} NOT FOUND BY THE MODEL",
            [f"{n.prior_label}: soft tissue still at its place, not measurable apart ({was})", *remarks],
        )
    return f"CURRENT - {n.prior_label} GONE", [f"{n.prior_label}: not found now ({was})", *remarks]


def prior_lines(n: NodeChange, date: str, prior_remarks: Sequence[str] = ()) -> list[str]:
    """The legend of the prior panel of a changed node: its prior sizes (for a new node, what
    its place held then), and whether the edge of the prior scan cut what was measured; for
    a small new node the prior CT's remarks last (`Comparison.prior_remarks`: its thick
    slices may have hidden the node; `followup.hidden_then`)."""
    if n.status == NEW:
        if n.short_axis_mm_prior is not None:
            lines = [
                f"{n.current_label}: measured at its place on {date}: short {n.short_axis_mm_prior:.1f} mm",
                *_cut(n.current_label, n.prior_at_scan_edge),
            ]
        elif n.seen_in_prior_image:
            lines = [f"{n.current_label}: its place was soft tissue on {date} (not found then)"]
        else:
            lines = [f"{n.current_label}: not present on {date}"]
        return [*lines, *(prior_remarks if hidden_then(n) else ())]
    change = "" if n.short_axis_change_mm is None else f", change {n.short_axis_change_mm:+.1f} mm"
    sizes = f"short {n.short_axis_mm_prior:.1f} mm, long {n.long_axis_mm_prior:.1f} mm"
    return [f"{n.prior_label}: {sizes}{change}", *_cut(n.prior_label, n.prior_at_scan_edge)]


def _cut(label: str | None, cut: bool) -> list[str]:
    """A line of its own for a size measured on a node cut by the edge of the scan."""
    return [ri.scan_edge_line(label)] if cut else []


def side_by_side(
    sources: SourceSeries,
    study_findings: StudyFindings,
    comparison: Comparison,
    prior: Volume,
    render: Callable,
) -> list[tuple[ri.KeyImage, np.ndarray]]:
    """(current key image, RGB pixels) of each changed node, prior on the left."""
    matrix = np.asarray(comparison.registration.matrix, dtype=float)
    to_prior = np.linalg.inv(matrix)
    index = {f.label: n for n, f in enumerate(study_findings.findings)}
    date = comparison.prior_study_date or "prior study"
    out = []
    for n in comparison.nodes:
        if not changed(n):
            continue
        if n.status == GONE:
            assert n.prior_centroid_lps_mm is not None
            here = matrix[:3, :3] @ np.asarray(n.prior_centroid_lps_mm) + matrix[:3, 3]
            k, row, col = _voxel(study_findings.affine, here, study_findings.shape)
            key = ri.KeyImage(k, ())
            title, text = gone_text(n, study_findings.remarks)
            current = _panel(ri.window(ri.slice_hu(sources, k)), (row, col), title, text, study_findings)
        else:
            f = study_findings.findings[index[n.current_label]]  # type: ignore[index]
            key = ri.KeyImage(int(f.key_slice), ((index[f.label], f),))
            current = render(sources, study_findings, key)
        if n.status == NEW:
            assert n.current_centroid_lps_mm is not None
            where = to_prior[:3, :3] @ np.asarray(n.current_centroid_lps_mm) + to_prior[:3, 3]
        else:
            assert n.prior_centroid_lps_mm is not None
            where = np.asarray(n.prior_centroid_lps_mm, dtype=float)
        k, row, col = _voxel(prior.affine, where, prior.shape)
        left = _panel(
            ri.window(prior.array[k]),
            (row, col),
            f"PRIOR {date}",
            prior_lines(n, date, comparison.prior_remarks),
            study_findings,
            current.shape,
        )
        gap = np.zeros((current.shape[0], GAP_PX, 3), np.uint8)
        out.append((key, np.concatenate([left, gap, current], axis=1)))
    return out


def _voxel(affine: np.ndarray, lps: np.ndarray, shape) -> tuple[int, int, int]:
    kji = np.linalg.solve(
        np.asarray(affine, float)[:3, :3], np.asarray(lps, float) - np.asarray(affine)[:3, 3]
    )
    k, j, i = (int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(kji, shape, strict=True))
    return k, j, i


def _panel(
    gray, point, title: str, lines: list[str], study_findings: StudyFindings, shape=None
) -> np.ndarray:
    """A windowed slice enlarged like the result images (or to `shape`), the node circled,
    the `title` as banner and `lines` as legend."""
    rows0, cols0 = gray.shape
    if shape is None:
        scale = max(1, math.ceil(ri.MIN_SIZE / max(gray.shape)))
        size = (cols0 * scale, rows0 * scale)
    else:
        size = (shape[1], shape[0])
    image = Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR).convert("RGB")
    draw = ImageDraw.Draw(image)
    sx, sy = size[0] / cols0, size[1] / rows0
    x, y = (point[1] + 0.5) * sx, (point[0] + 0.5) * sy
    radius = max(12.0, 0.05 * size[0])
    draw.ellipse(
        (x - radius, y - radius, x + radius, y + radius), outline=PRIOR_COLOUR, width=max(2, size[0] // 256)
    )
    base = max(12, size[1] // 40)
    margin = max(2, base // 3)
    banner = f"{title} - {ri.banner_text(study_findings.model)}"
    font = ri._fitting_font(draw, banner, size[0] - 2 * margin, base)
    height = draw.textbbox((0, 0), "Ag", font=font)[3] + 2 * margin
    draw.rectangle((0, 0, size[0], height), fill=(0, 0, 0))
    draw.text((margin, margin), banner, font=font, fill=ri.BANNER_COLOR)
    legend = [*lines, ri.footer_text()]
    font = ri._fitting_font(draw, max(legend, key=len), size[0] - 2 * margin, base)
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + margin
    y0 = size[1] - line_h * len(legend) - margin
    draw.rectangle((0, y0 - margin, size[0], size[1]), fill=(0, 0, 0))
    for n, text in enumerate(legend):
        draw.text((margin, y0 + n * line_h), text, font=font, fill=ri.BANNER_COLOR)
    return np.asarray(image, dtype=np.uint8)
