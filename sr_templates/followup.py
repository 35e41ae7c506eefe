"""The follow-up part of the SR: time points (TID 1502), prior values, changes, response.

Given a `inference.followup.Comparison`, the TID 1500 report gains, beside each node's own
groups (which then carry the current time point and the prior's tracking UID):

* per node seen before (matched or gone): a TID 1501 group of the prior time point with the
  same tracking UID and the prior's short axis, long axis and volume; a node the prior's
  analysis missed but that nodal measured at its place on the prior CT
  (`inference.followup.look`) gets the same group, with a comment saying so;
* per matched node, in its TID 1411 group: the relative change of each value (NUM with the
  value's own concept, unit %, derivation DCM "Fractional Change") and its RECIST role at
  baseline (DCM "Baseline Category", CID 6145); the change in mm, for which DICOM has no
  concept, is stated in the node's Comment beside the prior and current values;
* per new node: a prior time point group that says the node was absent there (present, if
  its place was soft tissue on the prior CT);
* per gone node: a current time point group that says it is absent now; present, if its
  place still holds soft tissue that could not be measured apart; or, measured at its place
  on the current CT, its current values and their changes, with a comment saying so;
* one summary group: the sum of the target nodes' short axes (derivation "Total"), its
  relative change, the response evaluation method (RECIST 1.1), the target and non-target
  responses (CID 6144) and the overall nodal response and SPD in words.

No private code is used: every concept is from DCM or SNOMED CT (sr_templates.codes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.coding import Code

from inference.followup import GONE, MATCHED, NEW, Comparison, NodeChange
from inference.followup.look import FAT, MEASURED, UNCLEAR
from sr_templates import codes

PRIOR_ORDER, CURRENT_ORDER = 1, 2
SUMMARY_IDENTIFIER = "Nodal response (RECIST 1.1)"


@dataclass(frozen=True)
class NodeExtras:
    """What a current node's own groups carry in a follow-up."""

    time_point: hd.sr.TimePointContext
    measurements: tuple[hd.sr.Measurement, ...] = ()
    evaluations: tuple[hd.sr.QualitativeEvaluation, ...] = ()
    comment_suffix: str = ""


@dataclass(frozen=True)
class FollowUpContent:
    """Everything the comparison adds to the report."""

    per_label: dict[str, NodeExtras]
    groups: list = field(default_factory=list)


def time_point(order: int, date: str) -> hd.sr.TimePointContext:
    """Time point context (TID 1502): ``"prior"`` or ``"current"`` with the study date."""
    name = "prior" if order == PRIOR_ORDER else "current"
    return hd.sr.TimePointContext(
        time_point=f"{name} {date}".strip()[:64],
        time_point_order=order,
    )


def content(
    comparison: Comparison,
    current_date: str,
    algorithm: hd.sr.AlgorithmIdentification,
    summary_uid: str,
) -> FollowUpContent:
    prior_tp = time_point(PRIOR_ORDER, comparison.prior_study_date)
    current_tp = time_point(CURRENT_ORDER, current_date)
    per_label: dict[str, NodeExtras] = {}
    groups: list = []
    for n in comparison.nodes:
        uid = n.tracking_uid
        name = (n.current_label or n.prior_label or "node")[:64]
        tracking = hd.sr.TrackingIdentifier(uid=uid, identifier=name)
        if n.short_axis_mm_prior is not None:  # matched, gone, or measured at its place then
            groups.append(_values(n, PRIOR_ORDER, tracking, prior_tp, algorithm))
        elif n.status == NEW:
            then = codes.PRESENT if n.seen_in_prior_image else codes.ABSENT
            groups.append(_presence(tracking, prior_tp, then, algorithm))
        if n.status == GONE:
            if n.short_axis_mm_current is not None:  # not found by the model, measured at its place
                groups.append(_values(n, CURRENT_ORDER, tracking, current_tp, algorithm))
            else:
                still = n.look is not None and n.look.outcome == UNCLEAR
                groups.append(
                    _presence(tracking, current_tp, codes.PRESENT if still else codes.ABSENT, algorithm)
                )
        if n.current_label is not None:
            per_label[n.current_label] = NodeExtras(
                time_point=current_tp,
                measurements=tuple(_changes(n)),
                evaluations=tuple(_role(n)),
                comment_suffix=_change_text(n, comparison.prior_study_date),
            )
    groups.append(_summary(comparison, current_tp, algorithm, summary_uid))
    return FollowUpContent(per_label=per_label, groups=groups)


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
    note = _look_text(n)
    if note:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT, value=note[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    return group


def _look_text(n: NodeChange) -> str:
    """How a size the model did not give was obtained, in words ("" for the model's own)."""
    if n.look is None or n.look.outcome != MEASURED:
        return ""
    study = "current" if n.status == GONE else "prior"
    return (
        f"not found by the model on the {study} CT; measured by nodal at its registered place there "
        "(soft tissue apart from its surroundings): to be confirmed by the reader"
    )


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


def _change_text(n: NodeChange, prior_date: str) -> str:
    """``"; new since 20260105"`` or ``"; SA 14.0 -> 9.8 mm (-4.2 mm, -30 %) since 20260105"``."""
    since = f" since {prior_date}" if prior_date else " since the prior study"
    sa0, sa1 = n.short_axis_mm_prior, n.short_axis_mm_current
    if n.status == NEW and sa0 is None:
        if n.seen_in_prior_image:
            return (
                f"; not found by the analysis of the prior study, but its place was soft tissue then{since}"
            )
        return f"; new{since}"
    if sa0 is None or sa1 is None:
        return ""
    pct = n.short_axis_change_percent
    pct_text = "" if pct is None else f", {pct:+.0f} %"
    how = " (prior size measured by nodal at its place on the prior CT)" if n.status == NEW else ""
    return f"; SA {sa0:.1f} -> {sa1:.1f} mm ({sa1 - sa0:+.1f} mm{pct_text}){since}{how}"


def _summary(comparison: Comparison, tp, algorithm, uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    s = comparison.summary
    measurements = []
    if s.target_prior_tracking_uids:
        measurements.append(
            _num(codes.SHORT_AXIS, s.sum_short_axis_current_mm, codes.UCUM_MM, derivation=codes.TOTAL)
        )
        if s.sum_short_axis_change_percent is not None:
            measurements.append(
                _num(
                    codes.SHORT_AXIS,
                    s.sum_short_axis_change_percent,
                    codes.UCUM_PERCENT,
                    derivation=codes.FRACTIONAL_CHANGE,
                )
            )
    evaluations = [hd.sr.QualitativeEvaluation(codes.RESPONSE_EVALUATION_METHOD, codes.RECIST_1_1)]
    if s.target_response in codes.TARGET_RESPONSES:
        evaluations.append(
            hd.sr.QualitativeEvaluation(codes.CURRENT_RESPONSE, codes.TARGET_RESPONSES[s.target_response])
        )
    if s.non_target_response in codes.NON_TARGET_RESPONSES:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                codes.CURRENT_RESPONSE, codes.NON_TARGET_RESPONSES[s.non_target_response]
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=SUMMARY_IDENTIFIER),
        time_point_context=tp,
        finding_type=codes.LYMPH_NODE,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=summary_text(comparison)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


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
    looked = [n for n in comparison.nodes if n.look is not None and n.look.outcome != FAT]
    for n in looked:
        label = n.prior_label if n.status == GONE else n.current_label
        study = "current" if n.status == GONE else "prior"
        if n.look is not None and n.look.outcome == MEASURED:
            parts.append(f"{label}: not found by the model on the {study} CT, measured at its place")
        elif n.look is not None:
            parts.append(f"{label}: not found by the model on the {study} CT; {n.look.note}")
    if s.recist_reason:
        parts.append(s.recist_reason)
    if comparison.registration.note:
        parts.append(comparison.registration.note)
    return "; ".join(parts).encode("ascii", "replace").decode("ascii")


def _num(name: Code, value: float, unit: Code, *, derivation: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=unit, derivation=derivation)
