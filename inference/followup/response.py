"""RECIST 1.1 nodal response and the Lugano sum of products, from node sizes at two times.

Only lymph nodes are assessed, and only two time points are known, so the nadir is the
baseline (the prior). The rules, with their sources, are in docs/follow-up-criteria.md:

* target nodes: short axis >= 15 mm at baseline, the largest first, at most
  `MAX_TARGET_NODES` (RECIST 1.1 allows two lesions per organ; lymph nodes count as one),
  leaving out nodes cut by the edge of the baseline scan (RECIST 1.1 takes as targets only
  lesions "suitable for accurate repeated measurements");
* non-target nodes: pathological (short axis >= 10 mm) at baseline and not targets;
* targets: CR when every target node is < 10 mm short axis; PD when the sum of their short
  axes grew by >= 20 % and >= 5 mm; PR when it fell by >= 30 %; SD otherwise. A target that
  is gone counts 0 mm. A target the model did not find now is looked for at its place
  (`inference.followup.look`): measured there, that size counts; soft tissue there that
  cannot be measured apart makes the targets not evaluable (NE) unless they progressed
  even with it at 0 mm; so does a target cut by the edge of the current scan, unless they
  progressed even with it at the size of its part in view;
* non-targets: CR when all are < 10 mm (or gone), none of them unassessed nor cut by the
  edge of the current scan; their unequivocal progression is a radiologist's judgement and
  is not called automatically;
* a new node is an unequivocal new lesion at >= 15 mm short axis (PD); a new node of
  10-15 mm is equivocal (reported, to be confirmed at the next study); a node without a
  prior match whose place was soft tissue on the prior CT is not new (`seen_before`);
* overall: RECIST 1.1 table 1 (targets, non-targets, new lesions).

Lugano (Cheson 2014): the sum of the products of the perpendicular diameters (long axis x
short axis on the axial slice) of up to `MAX_SPD_NODES` measurable nodes (long axis > 15 mm),
the largest products first, at baseline and the same nodes now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference.followup.types import FollowUpError, ResponseSummary

TARGET_MIN_SA_MM = 15.0
PATHOLOGICAL_MIN_SA_MM = 10.0
MAX_TARGET_NODES = 2
PD_INCREASE = 0.20
PD_MIN_MM = 5.0
PR_DECREASE = 0.30
NEW_LESION_MIN_SA_MM = 15.0
MAX_SPD_NODES = 6
SPD_MIN_LA_MM = 15.0

TARGET, NON_TARGET, NORMAL = "target", "non-target", "normal"
CR, PR, SD, PD, NON_CR_NON_PD, NE = "CR", "PR", "SD", "PD", "non-CR/non-PD", "NE"


@dataclass(frozen=True)
class NodeSizes:
    """One node at both times; None where it is absent (new: no prior; gone: no current)."""

    key: str  # the prior tracking UID (or the current one for a new node)
    sa_prior: float | None
    la_prior: float | None
    sa_current: float | None
    la_current: float | None
    seen_before: bool = False  # a new node whose place was soft tissue in the prior CT
    #: one side's sizes were measured at the node's place, where the model did not find it
    #: (`inference.followup.look`)
    looked: bool = False
    #: the model did not find the node now, and its place still holds soft tissue that
    #: cannot be measured apart from its surroundings: not evaluable
    unassessed: bool = False
    #: at baseline the node reached the edge of the scanned volume (`rules.FLAG_SCAN_EDGE`):
    #: not measurable whole, so never a target (a non-target if pathological)
    at_scan_edge: bool = False
    #: now the node reaches the edge of the current scan: its current size is that of the
    #: part in view, a lower bound. A target so cut is not evaluable unless the targets
    #: progressed even so; a non-target so cut is not called normal
    at_scan_edge_now: bool = False

    def __post_init__(self) -> None:
        for name in ("sa_prior", "la_prior", "sa_current", "la_current"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise FollowUpError(f"node {self.key}: {name} must be a size >= 0 mm, got {v}")
        if (self.sa_prior is None) != (self.la_prior is None) or (self.sa_current is None) != (
            self.la_current is None
        ):
            raise FollowUpError(f"node {self.key}: short and long axis must both be given or both absent")
        if self.sa_prior is None and self.sa_current is None:
            raise FollowUpError(f"node {self.key} is absent at both times")
        if self.unassessed and self.sa_current is not None:
            raise FollowUpError(f"node {self.key}: an unassessed node has no current size")
        if self.at_scan_edge_now and self.sa_current is None:
            raise FollowUpError(f"node {self.key}: a node cut by the edge of the scan now has a current size")


def roles(nodes: Sequence[NodeSizes]) -> dict[str, str]:
    """The RECIST 1.1 role of each node present at baseline: target, non-target or normal."""
    present = [n for n in nodes if n.sa_prior is not None]
    ranked = sorted(present, key=lambda n: (-float(n.sa_prior or 0.0), n.key))
    out: dict[str, str] = {}
    for n in ranked:
        sa = float(n.sa_prior or 0.0)
        targets = sum(1 for r in out.values() if r == TARGET)
        if sa >= TARGET_MIN_SA_MM and targets < MAX_TARGET_NODES and not n.at_scan_edge:
            out[n.key] = TARGET
        elif sa >= PATHOLOGICAL_MIN_SA_MM:
            out[n.key] = NON_TARGET
        else:
            out[n.key] = NORMAL
    return out


def assess(nodes: Sequence[NodeSizes]) -> ResponseSummary:
    """RECIST 1.1 nodal response and Lugano SPD of `nodes` (see the module's rules)."""
    keys = [n.key for n in nodes]
    if len(set(keys)) != len(keys):
        raise FollowUpError("each node must appear once (duplicate keys)")
    role = roles(nodes)
    targets = [n for n in nodes if role.get(n.key) == TARGET]
    non_targets = [n for n in nodes if role.get(n.key) == NON_TARGET]
    new = [n for n in nodes if n.sa_prior is None and not n.seen_before]
    missed = [n for n in nodes if n.sa_prior is None and n.seen_before]
    looked = [n for n in nodes if n.looked]
    unassessed_targets = [n for n in targets if n.unassessed]
    cut_targets = [n for n in targets if n.at_scan_edge_now]
    unequivocal = [n for n in new if float(n.sa_current or 0.0) >= NEW_LESION_MIN_SA_MM]
    equivocal = [
        n for n in new if PATHOLOGICAL_MIN_SA_MM <= float(n.sa_current or 0.0) < NEW_LESION_MIN_SA_MM
    ]

    sum_prior = sum(float(n.sa_prior or 0.0) for n in targets)
    sum_current = sum(float(n.sa_current or 0.0) for n in targets)
    reasons = []
    target_response = None
    if targets:
        change = sum_current - sum_prior
        # even with unknown sizes at 0 mm and cut nodes at the size of their part in view
        if change >= PD_INCREASE * sum_prior and change >= PD_MIN_MM:
            target_response = PD
            reasons.append(f"sum of target short axes +{change:.1f} mm (>= 20 % and >= 5 mm)")
        elif unassessed_targets or cut_targets:  # a size unknown: nothing but progression can be called
            target_response = NE
            if unassessed_targets:
                reasons.append(
                    f"{len(unassessed_targets)} target node(s) not found now, their place still soft "
                    "tissue that cannot be measured apart: not evaluable"
                )
            if cut_targets:
                reasons.append(
                    f"{len(cut_targets)} target node(s) cut by the edge of the scan now, measured in "
                    "part: not evaluable"
                )
        elif all(float(n.sa_current or 0.0) < PATHOLOGICAL_MIN_SA_MM for n in targets):
            target_response = CR
            reasons.append("every target node < 10 mm short axis")
        elif change <= -PR_DECREASE * sum_prior:
            target_response = PR
            reasons.append(f"sum of target short axes {100 * change / sum_prior:.0f} % (<= -30 %)")
        else:
            target_response = SD
            reasons.append(f"sum of target short axes {100 * change / sum_prior:+.0f} %")
    non_target_cr = all(
        float(n.sa_current or 0.0) < PATHOLOGICAL_MIN_SA_MM and not (n.unassessed or n.at_scan_edge_now)
        for n in non_targets
    )
    if non_targets:
        reasons.append("non-target nodes " + ("all < 10 mm" if non_target_cr else "present (non-CR/non-PD)"))
    if unequivocal:
        reasons.append(f"{len(unequivocal)} new node(s) >= 15 mm short axis")
    if equivocal:
        reasons.append(f"{len(equivocal)} new node(s) 10-15 mm: equivocal, to be confirmed")
    if looked:
        reasons.append(f"{len(looked)} node(s) measured at their place where the model did not find them")
    if missed:
        reasons.append(
            f"{len(missed)} node(s) without a prior match already visible on the prior CT: not new lesions"
        )

    if unequivocal or target_response == PD:
        overall = PD
    elif target_response == CR:
        overall = CR if non_target_cr else PR
    elif target_response in (PR, SD, NE):
        overall = target_response
    elif non_targets:
        overall = CR if non_target_cr else NON_CR_NON_PD
    else:
        overall = NE
        reasons.append("no target or non-target node at baseline")

    index = _spd_nodes(nodes)
    targets_first = sorted(targets, key=lambda n: (-float(n.sa_prior or 0.0), n.key))
    return ResponseSummary(
        target_prior_tracking_uids=tuple(n.key for n in targets_first),
        sum_short_axis_prior_mm=sum_prior,
        sum_short_axis_current_mm=sum_current,
        recist_response=overall,
        recist_reason="; ".join(reasons),
        spd_prior_mm2=sum(_ppd(n.sa_prior, n.la_prior) for n in index),
        spd_current_mm2=sum(_ppd(n.sa_current, n.la_current) for n in index),
        new_nodes=len(unequivocal),
        target_response=target_response or "",
        non_target_response=(CR if non_target_cr else NON_CR_NON_PD) if non_targets else "",
    )


def _spd_nodes(nodes: Sequence[NodeSizes]) -> list[NodeSizes]:
    """Lugano index nodes: measurable at baseline (long axis > 15 mm), largest products first."""
    measurable = [n for n in nodes if n.la_prior is not None and n.la_prior > SPD_MIN_LA_MM]
    measurable.sort(key=lambda n: (-_ppd(n.sa_prior, n.la_prior), n.key))
    return measurable[:MAX_SPD_NODES]


def _ppd(sa: float | None, la: float | None) -> float:
    return 0.0 if sa is None or la is None else float(sa) * float(la)
