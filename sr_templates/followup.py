"""The follow-up part of the SR: time points (TID 1502), prior values, changes, response.

Given a `inference.followup.Comparison`, the TID 1500 report gains, beside each node's own
groups (which then carry the current time point and the prior's tracking UID):

* per matched node: a TID 1501 group of the prior time point with the same tracking UID
  and the prior's short axis, long axis and volume; a new node the prior's analysis missed
  but that nodal measured at its place on the prior CT (`inference.followup.look`) gets the
  same group, with a comment saying so;
* per gone node: the same values in a TID 1411 group whose region is the node's centroid
  in the prior study (a SCOORD3D POINT in the prior CT's frame of reference, the prior CT
  series as its source), and a current time point group that says it is absent now;
  present, if its place still holds soft tissue that could not be measured apart; or,
  measured at its place on the current CT, its current values and their changes, with a
  comment saying so;
* per matched node, in its TID 1411 group: the relative change of each value (NUM with the
  value's own concept, unit %, derivation DCM "Fractional Change") and its RECIST role at
  baseline (DCM "Baseline Category", CID 6145); the change in mm, for which DICOM has no
  concept, is stated in the node's Comment beside the prior and current values;
* per new node: a prior time point group that says the node was absent there (present, if
  its place was soft tissue on the prior CT);
* the study's response, in the report's Qualitative Evaluations container (TID 1500 row
  12, UMLS "Qualitative Evaluations"): the response evaluation method (RECIST 1.1), the
  target and non-target responses (CID 6144) as CODE items, and in a TEXT item the overall
  nodal response, the sum of the target nodes' short axes before and now, SPD, and counts.

Every node in Imaging Measurements thus has a coordinate somewhere in its groups: OHIF
(3.13) merges groups by tracking UID and stops loading the SR's measurements at a node
without any, so that none is drawn (docs/follow-up.md, "In OHIF"). A gone node's point is
in the prior's frame of reference: OHIF places it on the prior study's series once that
study is open, and draws it nowhere. Without the prior's frame of reference (not known),
a gone node's prior values stay in a TID 1501 group without a place.

No private code is used: every concept is from DCM, SNOMED CT or UMLS (sr_templates.codes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code

from inference import rules
from inference.followup import GONE, MATCHED, NEW, Comparison, NodeChange
from inference.followup.look import FAT, MEASURED, UNCLEAR
from sr_templates import codes

PRIOR_ORDER, CURRENT_ORDER = 1, 2
#: how the prior time point's Time Point (TID 1502) text begins, before the study date
PRIOR_NAME = "prior"


@dataclass(frozen=True)
class NodeExtras:
    """What a current node's own groups carry in a follow-up."""

    time_point: hd.sr.TimePointContext
    #: the axes group's: the same time point without its order. OHIF draws a node's first
    #: five values beside its lines (its line, both axes, then the next numbers in document
    #: order); an order there would push the probability of cancer out
    axes_time_point: hd.sr.TimePointContext
    measurements: tuple[hd.sr.Measurement, ...] = ()
    evaluations: tuple[hd.sr.QualitativeEvaluation, ...] = ()
    comment_suffix: str = ""


@dataclass(frozen=True)
class FollowUpContent:
    """Everything the comparison adds to the report."""

    per_label: dict[str, NodeExtras]
    groups: list = field(default_factory=list)
    #: the report's Qualitative Evaluations container (TID 1500 row 12): the response
    evaluations: hd.sr.ContainerContentItem | None = None


def time_point(order: int, date: str, *, numbered: bool = True) -> hd.sr.TimePointContext:
    """Time point context (TID 1502): ``"prior"`` or ``"current"`` with the study date, and
    its Time Point Order (optional in TID 1502) unless not `numbered`."""
    name = PRIOR_NAME if order == PRIOR_ORDER else "current"
    return hd.sr.TimePointContext(
        time_point=f"{name} {date}".strip()[:64],
        time_point_order=order if numbered else None,
    )


#: the concepts of a time point context as `time_point` writes it (Time Point, its Order)
_TIME_POINT_CONCEPTS = frozenset(i.ConceptNameCodeSequence[0].CodeValue for i in time_point(PRIOR_ORDER, "x"))


def time_point_last(group) -> None:
    """Move a group's time point context (TID 1502) after its measurements, evaluations and
    comment. TID 1501 and TID 1411 are of non-significant order; OHIF takes the first NUM of
    a group as the measurement that holds its lines (an editable SR, docs/results.md) and
    lists a node's values in document order (docs/follow-up.md, "In OHIF")."""
    items = group[0].ContentSequence
    point = [i.ConceptNameCodeSequence[0].CodeValue in _TIME_POINT_CONCEPTS for i in items]
    reordered = [i for i, p in zip(items, point, strict=True) if not p]
    reordered += [i for i, p in zip(items, point, strict=True) if p]
    items.clear()  # in place, by position
    items.extend(reordered)


def content(
    comparison: Comparison,
    current_date: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> FollowUpContent:
    prior_tp = time_point(PRIOR_ORDER, comparison.prior_study_date)
    current_tp = time_point(CURRENT_ORDER, current_date)
    per_label: dict[str, NodeExtras] = {}
    groups: list = []
    for n in comparison.nodes:
        uid = n.tracking_uid
        name = (n.current_label or n.prior_label or "node")[:64]
        tracking = hd.sr.TrackingIdentifier(uid=uid, identifier=name)
        if n.status == GONE:
            groups.append(_gone_prior_values(n, tracking, prior_tp, algorithm, comparison))
            if n.short_axis_mm_current is not None:  # not found by the model, measured at its place
                groups.append(_values(n, CURRENT_ORDER, tracking, current_tp, algorithm))
            else:
                still = n.look is not None and n.look.outcome == UNCLEAR
                now = codes.PRESENT if still else codes.ABSENT
                groups.append(_presence(tracking, current_tp, now, algorithm))
        elif n.short_axis_mm_prior is not None:  # matched, or measured at its place then
            groups.append(_values(n, PRIOR_ORDER, tracking, prior_tp, algorithm))
        elif n.status == NEW:
            then = codes.PRESENT if n.seen_in_prior_image else codes.ABSENT
            groups.append(_presence(tracking, prior_tp, then, algorithm))
        if n.current_label is not None:
            per_label[n.current_label] = NodeExtras(
                time_point=current_tp,
                axes_time_point=time_point(CURRENT_ORDER, current_date, numbered=False),
                measurements=tuple(_changes(n)),
                evaluations=tuple(_role(n)),
                comment_suffix=_change_text(n, comparison.prior_study_date, comparison.prior_remarks),
            )
    return FollowUpContent(per_label=per_label, groups=groups, evaluations=_response(comparison))


def _prior_measurements(n: NodeChange) -> list[hd.sr.Measurement]:
    values = [
        (codes.SHORT_AXIS, n.short_axis_mm_prior, codes.UCUM_MM),
        (codes.LONG_AXIS, n.long_axis_mm_prior, codes.UCUM_MM),
        (codes.VOLUME, n.volume_mm3_prior, codes.UCUM_MM3),
    ]
    return [_num(c, v, u) for c, v, u in values if v is not None]


def _values(
    n: NodeChange, order: int, tracking, tp, algorithm
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A node's sizes at one time point, as its own TID 1501 group: the prior's values, or
    (a gone node measured at its place) the current ones with their changes."""
    prior = order == PRIOR_ORDER
    values = [
        (codes.SHORT_AXIS, n.short_axis_mm_prior if prior else n.short_axis_mm_current, codes.UCUM_MM),
        (codes.LONG_AXIS, n.long_axis_mm_prior if prior else n.long_axis_mm_current, codes.UCUM_MM),
        (codes.VOLUME, n.volume_mm3_prior if prior else n.volume_mm3_current, codes.UCUM_MM3),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        time_point_context=tp,
        finding_type=codes.LYMPH_NODE,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm,
        measurements=[_num(c, v, u) for c, v, u in values if v is not None] + ([] if prior else _changes(n)),
        qualitative_evaluations=list(_role(n)),
    )
    edge = _edge_text() if prior and n.prior_at_scan_edge else ""
    add_comment(group, "; ".join(t for t in (_look_text(n), edge) if t))
    return group


def add_comment(group, text: str) -> None:
    """A Comment (DCM 121106, TEXT, CONTAINS) in a TID 1501 group (or `[container]`), where
    there is something to say (here, for the no-findings group, `sr.no_findings_group`, and
    in the report's Qualitative Evaluations, `evaluations_container`)."""
    if text:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )


def _edge_text() -> str:
    return (
        "cut by the edge of the prior scan: measured in part, so not a RECIST 1.1 target "
        "(not suitable for accurate repeated measurement)"
    )


def _look_text(n: NodeChange) -> str:
    """How a size the model did not give was obtained, in words ("" for the model's own)."""
    if n.look is None or n.look.outcome != MEASURED:
        return ""
    study = "current" if n.status == GONE else "prior"
    # a prior-side size cut by the scan's edge is said by the prior values' edge comment
    cut = f"; {rules.SCAN_EDGE_REMARK}" if n.look.at_scan_edge and n.status == GONE else ""
    return (
        f"not found by the model on the {study} CT; measured by nodal at its registered place there "
        f"(soft tissue apart from its surroundings){cut}: to be confirmed by the reader"
    )


def _gone_prior_values(
    n: NodeChange, tracking, tp, algorithm, comparison: Comparison
) -> hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """A gone node's values at the prior time point, placed at its centroid in the prior
    study (TID 1411, volume surface: a SCOORD3D POINT in the prior's frame of reference,
    the prior CT series as source); without that frame of reference, as a matched node's."""
    frame = comparison.prior_frame_of_reference_uid
    series = comparison.prior_series_instance_uid
    if not frame or not series or n.prior_centroid_lps_mm is None:
        return _values(n, PRIOR_ORDER, tracking, tp, algorithm)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([n.prior_centroid_lps_mm], dtype=np.float64),
            frame_of_reference_uid=frame,
            source_series=hd.sr.SourceSeriesForSegmentation(series),
        ),
        time_point_context=tp,
        finding_type=codes.LYMPH_NODE,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm,
        measurements=_prior_measurements(n),
        qualitative_evaluations=list(_role(n)),
    )
    add_comment(group, _edge_text() if n.prior_at_scan_edge else "")
    return group


def _presence(tracking, tp, value: Code, algorithm) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        time_point_context=tp,
        finding_type=codes.LYMPH_NODE,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.PRESENCE_OF_PROPERTY, value)],
    )


def _changes(n: NodeChange) -> list[hd.sr.Measurement]:
    if n.short_axis_mm_prior is None or n.short_axis_mm_current is None:
        return []
    pairs = [
        (codes.SHORT_AXIS, n.short_axis_change_percent),
        (codes.LONG_AXIS, n.long_axis_change_percent),
        (codes.VOLUME, n.volume_change_percent),
    ]
    return [
        _num(c, v, codes.UCUM_PERCENT, derivation=codes.FRACTIONAL_CHANGE) for c, v in pairs if v is not None
    ]


def _role(n: NodeChange) -> list[hd.sr.QualitativeEvaluation]:
    role = codes.BASELINE_ROLES.get(n.recist_role)
    return [] if role is None else [hd.sr.QualitativeEvaluation(codes.BASELINE_CATEGORY, role)]


def _change_text(n: NodeChange, prior_date: str, prior_remarks: Sequence[str] = ()) -> str:
    """``"; new since 20260105"`` or ``"; SA 14.0 -> 9.8 mm (-4.2 mm, -30 %) since 20260105"``;
    a small new node's (under 10 mm short axis) ends with the prior CT's remarks
    (`Comparison.prior_remarks`: its thick slices may have hidden the node)."""
    since = f" since {prior_date}" if prior_date else " since the prior study"
    sa0, sa1 = n.short_axis_mm_prior, n.short_axis_mm_current
    older = "".join(f"; {remark}" for remark in prior_remarks) if hidden_then(n) else ""
    if n.status == NEW and sa0 is None:
        if n.seen_in_prior_image:
            of = f" of {prior_date}" if prior_date else ""
            missed = f"; not found by the analysis of the prior study{of}"
            return f"{missed}, but its place was soft tissue then{older}"
        return f"; new{since}{older}"
    if sa0 is None or sa1 is None:
        return ""
    pct = n.short_axis_change_percent
    pct_text = "" if pct is None else f", {pct:+.0f} %"
    how = " (prior size measured by nodal at its place on the prior CT)" if n.status == NEW else ""
    return f"; SA {sa0:.1f} -> {sa1:.1f} mm ({sa1 - sa0:+.1f} mm{pct_text}){since}{how}{older}"


def hidden_then(n: NodeChange) -> bool:
    """Whether the prior CT's thick slices may have hidden node `n`: it is new, and small
    (under 10 mm short axis now), the size the card's slice limit was measured on."""
    return n.status == NEW and n.short_axis_mm_current is not None and n.short_axis_mm_current < 10.0


def _response(comparison: Comparison) -> hd.sr.ContainerContentItem:
    """The study's response: TID 1500 rows 12-14 (Qualitative Evaluations; CODE, TEXT)."""
    s = comparison.summary
    pairs = [(codes.RESPONSE_EVALUATION_METHOD, codes.RECIST_1_1)]
    if s.target_response in codes.TARGET_RESPONSES:
        pairs.append((codes.CURRENT_RESPONSE, codes.TARGET_RESPONSES[s.target_response]))
    if s.non_target_response in codes.NON_TARGET_RESPONSES:
        pairs.append((codes.CURRENT_RESPONSE, codes.NON_TARGET_RESPONSES[s.non_target_response]))
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = evaluations_container(
        [hd.sr.CodeContentItem(name=name, value=value, relationship_type=contains) for name, value in pairs]
    )
    add_comment([container], summary_text(comparison))
    return container


def evaluations_container(items: list) -> hd.sr.ContainerContentItem:
    """The report's Qualitative Evaluations container (TID 1500 row 12) holding `items`;
    `add_comment([container], text)` adds a Comment (row 14)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def summary_text(comparison: Comparison) -> str:
    """The study's answer in words (ASCII), e.g. ``"Nodal response (RECIST 1.1): PR; ..."``."""
    s = comparison.summary
    parts = [
        f"Nodal response (RECIST 1.1) vs prior {comparison.prior_study_date or 'study'}: {s.recist_response}"
    ]
    if s.target_prior_tracking_uids:
        before, now = s.sum_short_axis_prior_mm, s.sum_short_axis_current_mm
        parts.append(f"sum of target short axes {before:.1f} -> {now:.1f} mm")
    if s.spd_prior_mm2 > 0:
        pct = s.spd_change_percent
        parts.append(
            f"SPD (Lugano) {s.spd_prior_mm2:.0f} -> {s.spd_current_mm2:.0f} mm2"
            + ("" if pct is None else f" ({pct:+.0f} %)")
        )
    counts = {st: sum(1 for n in comparison.nodes if n.status == st) for st in (MATCHED, NEW, GONE)}
    parts.append(f"{counts[MATCHED]} matched, {counts[NEW]} new, {counts[GONE]} gone")
    parts.extend(comparison.prior_remarks)  # early: the Comment is cut at 1024 characters
    looked = [n for n in comparison.nodes if n.look is not None and n.look.outcome != FAT]
    for n in looked:
        label = n.prior_label if n.status == GONE else n.current_label
        study = "current" if n.status == GONE else "prior"
        if n.look is not None and n.look.outcome == MEASURED:
            cut = f" ({rules.SCAN_EDGE_REMARK})" if n.look.at_scan_edge else ""
            parts.append(f"{label}: not found by the model on the {study} CT, measured at its place{cut}")
        elif n.look is not None:
            parts.append(f"{label}: not found by the model on the {study} CT; {n.look.note}")
    if s.recist_reason:
        parts.append(s.recist_reason)
    if comparison.registration.note:
        parts.append(comparison.registration.note)
    return "; ".join(parts).encode("ascii", "replace").decode("ascii")


def _num(name: Code, value: float, unit: Code, *, derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=unit, derivation=derivation)
