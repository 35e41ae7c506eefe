"""Routing rules: which series of a complete study are analysed, and why the others are not.

`route` is a pure function of a series summary and the configured rules: the first rule
that matches selects the series; when none does, the decision carries each rule's reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dicom_node.config import RoutingRule


@dataclass(frozen=True)
class SeriesSummary:
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    slice_thickness_mm: float | None
    description: str
    slices: int  # instances, or frames for multi-frame objects


@dataclass(frozen=True)
class Decision:
    selected: bool
    # the rule that selected the series (also when it is skipped as another reconstruction
    # of a scan whose chosen one is analysed: `completion.quiet.decisions`)
    rule: str | None
    reason: str  # why selected, or why every rule refused it


def route(series: SeriesSummary, rules: list[RoutingRule]) -> Decision:
    if not rules:
        return Decision(False, None, "no routing rules configured")
    refusals = []
    for rule in rules:
        why_not = _mismatch(series, rule)
        if why_not is None:
            return Decision(True, rule.name, f"matches rule {rule.name}")
        refusals.append(f"{rule.name}: {why_not}")
    return Decision(False, None, "; ".join(refusals))


def _mismatch(s: SeriesSummary, rule: RoutingRule) -> str | None:
    """The first reason `rule` refuses the series, or None when it matches."""
    if rule.modalities and s.modality.upper() not in {m.upper() for m in rule.modalities}:
        return f"modality {s.modality or '(none)'} is not {'/'.join(rule.modalities)}"
    if rule.sop_classes and s.sop_class_uid not in rule.sop_classes:
        return f"SOP class {s.sop_class_uid} is not one the rule accepts"
    missing = [v for v in rule.image_type_contains if v.upper() not in s.image_type]
    if missing:
        return f"image type {'/'.join(s.image_type) or '(none)'} lacks {'/'.join(missing)}"
    thickness = s.slice_thickness_mm
    if thickness is None:
        if rule.min_slice_thickness_mm > 0:
            return "slice thickness unknown"
    elif not rule.min_slice_thickness_mm <= thickness <= rule.max_slice_thickness_mm:
        return (
            f"slice thickness {thickness:g} mm outside "
            f"{rule.min_slice_thickness_mm:g}-{rule.max_slice_thickness_mm:g} mm"
        )
    if s.slices < rule.min_slices:
        return f"{s.slices} slices, fewer than {rule.min_slices}"
    if rule.include_descriptions and not any(re.search(p, s.description) for p in rule.include_descriptions):
        return "series description matches no include pattern"
    for pattern in rule.exclude_descriptions:
        if re.search(pattern, s.description):
            return f"series description matches exclude pattern {pattern!r}"
    return None
