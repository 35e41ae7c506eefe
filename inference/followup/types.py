"""The values of a follow-up comparison: the prior study, its nodes, and what changed.

This module is the interface between the comparison (`inference.followup`), the node that
finds and fetches the prior (`dicom_node`) and the result writers (`sr_templates`). It
imports only the standard library, NumPy and `inference.findings` / `inference.rules` /
`inference.volume`, so that none of them pulls in torch.

Coordinates are DICOM LPS millimetres. A transform is a 4x4 matrix that maps a point of the
prior study's frame of reference to the current study's: ``current = M @ (prior, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from inference import rules
from inference.findings import Point3, StudyFindings, rounded

if TYPE_CHECKING:
    from inference.followup.look import Look
    from inference.volume import Volume

Matrix4 = tuple[tuple[float, ...], ...]  # 4 rows of 4
IDENTITY: Matrix4 = tuple(tuple(float(v) for v in row) for row in np.eye(4))

#: NodeChange.status values
MATCHED, NEW, GONE = "matched", "new", "gone"
#: PriorStudy.source values
FROM_SR, FROM_ANALYSIS = "sr", "analysed"


class FollowUpError(ValueError):
    """The comparison cannot be made from these inputs (the message says why)."""


@dataclass(frozen=True)
class PriorNode:
    """One node of the prior study, as measured then."""

    label: str  # "LN-1" ...
    tracking_uid: str
    centroid_lps_mm: Point3
    short_axis_mm: float
    long_axis_mm: float
    volume_mm3: float | None
    malignancy_probability: float | None = None
    #: the node reached the edge of the prior scan (`rules.FLAG_SCAN_EDGE`): never a target
    at_scan_edge: bool = False


@dataclass(frozen=True)
class PriorStudy:
    """The prior study of a patient and its nodes."""

    study_instance_uid: str
    series_instance_uid: str
    study_date: str  # DICOM DA, YYYYMMDD ("" if unknown)
    nodes: tuple[PriorNode, ...]
    volume: Volume | None = field(default=None, repr=False)  # the prior CT; None if not retrieved
    source: str = FROM_ANALYSIS  # FROM_SR: read from nodal's SR; FROM_ANALYSIS: analysed now
    frame_of_reference_uid: str = ""


@dataclass(frozen=True)
class FollowUpSettings:
    """How the comparison is made (defaults as documented in docs/follow-up-criteria.md)."""

    registration: str = "affine"  # "affine" (rigid first, then affine) | "rigid" | "none"
    registration_grid_mm: float = 4.0  # both CTs are resampled to this isotropic grid
    body_hu: float = -500.0  # body mask: above this
    bone_hu: float = 250.0  # bone mask: above this
    #: the worst acceptable mean bone-surface residual after registration; above it the
    #: registration is rejected and the centroids are matched without it (recorded)
    max_bone_residual_mm: float = 6.0
    gate_min_mm: float = 10.0  # distance gate: max(gate_min_mm, gate_long_axis_factor x long axis)
    gate_long_axis_factor: float = 1.0
    #: a node without a prior match is an unequivocal new lesion only where the prior CT
    #: showed no soft tissue there: at most this share of its voxels, mapped into the prior,
    #: above `soft_tissue_hu` (more: the node was there, the prior analysis missed it)
    new_node_max_prior_tissue: float = 0.5
    soft_tissue_hu: float = -30.0
    #: look at the place of a node found in one study only, in the other study's CT
    #: (`inference.followup.look`), and measure it there when it stands apart
    look_at_place: bool = True

    def __post_init__(self) -> None:
        if self.registration not in ("affine", "rigid", "none"):
            raise FollowUpError(
                f"registration must be 'affine', 'rigid' or 'none', not {self.registration!r}"
            )
        for name in ("registration_grid_mm", "gate_min_mm", "max_bone_residual_mm"):
            if not getattr(self, name) > 0:
                raise FollowUpError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.new_node_max_prior_tissue <= 1.0:
            raise FollowUpError(
                f"new_node_max_prior_tissue is a share in [0, 1], got {self.new_node_max_prior_tissue}"
            )
        if self.gate_long_axis_factor < 0:
            raise FollowUpError(f"gate_long_axis_factor must be >= 0, got {self.gate_long_axis_factor}")


def _apply(m: np.ndarray, p: Point3) -> Point3:
    q = m[:3, :3] @ np.asarray(p, dtype=float) + m[:3, 3]
    return (float(q[0]), float(q[1]), float(q[2]))


@dataclass(frozen=True)
class Registration:
    """How the prior was brought into the current frame."""

    method: str  # "affine" | "rigid" | "identity" (no prior volume, or a rejected registration)
    matrix: Matrix4 = IDENTITY  # prior LPS -> current LPS
    metric: float | None = None  # the optimiser's final metric (Mattes mutual information)
    bone_residual_mm: float | None = None  # mean distance of registered prior bone surface to current bone
    note: str = ""  # why a fallback was taken ("" when the registration was used)
    seconds: float = 0.0

    def map_point(self, p: Point3) -> Point3:
        return _apply(np.asarray(self.matrix, dtype=float), p)

    def map_back(self, p: Point3) -> Point3:
        """A current LPS point in the prior's frame (the inverse of `map_point`)."""
        return _apply(np.linalg.inv(np.asarray(self.matrix, dtype=float)), p)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "matrix": [[round(v, 6) for v in row] for row in self.matrix],
            "metric": None if self.metric is None else round(self.metric, 5),
            "bone_residual_mm": None if self.bone_residual_mm is None else round(self.bone_residual_mm, 2),
            "note": self.note,
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class NodeChange:
    """One node across the two studies."""

    status: str  # MATCHED | NEW | GONE
    current_label: str | None
    current_tracking_uid: str | None
    prior_label: str | None
    prior_tracking_uid: str | None
    short_axis_mm_prior: float | None
    short_axis_mm_current: float | None
    long_axis_mm_prior: float | None
    long_axis_mm_current: float | None
    volume_mm3_prior: float | None
    volume_mm3_current: float | None
    distance_mm: float | None = None  # registered prior centroid to current centroid
    recist_role: str = ""  # at baseline: "target" | "non-target" | "normal" | "" (new node)
    prior_centroid_lps_mm: Point3 | None = None  # in the prior's frame
    current_centroid_lps_mm: Point3 | None = None  # in the current frame
    #: new nodes, with a prior CT: the share of the node's voxels that were soft tissue in
    #: the prior CT (registered); None without a prior CT
    prior_tissue_share: float | None = None
    #: a new node whose place was soft tissue in the prior CT (more than
    #: `FollowUpSettings.new_node_max_prior_tissue`): present then, not found by the prior's
    #: analysis; not counted as a new lesion
    seen_in_prior_image: bool = False
    #: where the model found the node in one study only: what its place in the other study
    #: holds (gone: the current CT; new and seen before: the prior CT). Measured there, its
    #: sizes fill that study's side above (`inference.followup.look`)
    look: Look | None = None
    #: the node reached the edge of the prior scan: not measurable whole then, so no target
    prior_at_scan_edge: bool = False

    @property
    def tracking_uid(self) -> str:
        """The node's tracking UID in the current report: the prior's when matched."""
        uid = self.prior_tracking_uid if self.status == MATCHED else self.current_tracking_uid
        if uid is None:
            uid = self.prior_tracking_uid
        return str(uid)

    @property
    def short_axis_change_mm(self) -> float | None:
        return _diff(self.short_axis_mm_current, self.short_axis_mm_prior)

    @property
    def short_axis_change_percent(self) -> float | None:
        return _percent(self.short_axis_mm_current, self.short_axis_mm_prior)

    @property
    def long_axis_change_mm(self) -> float | None:
        return _diff(self.long_axis_mm_current, self.long_axis_mm_prior)

    @property
    def long_axis_change_percent(self) -> float | None:
        return _percent(self.long_axis_mm_current, self.long_axis_mm_prior)

    @property
    def volume_change_mm3(self) -> float | None:
        return _diff(self.volume_mm3_current, self.volume_mm3_prior)

    @property
    def volume_change_percent(self) -> float | None:
        return _percent(self.volume_mm3_current, self.volume_mm3_prior)

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "current_label": self.current_label,
            "current_tracking_uid": self.current_tracking_uid,
            "prior_label": self.prior_label,
            "prior_tracking_uid": self.prior_tracking_uid,
            "recist_role": self.recist_role,
            "distance_mm": rounded(self.distance_mm, 2),
            "prior_tissue_share": rounded(self.prior_tissue_share, 3),
            "seen_in_prior_image": self.seen_in_prior_image,
            "prior_at_scan_edge": self.prior_at_scan_edge,
            "look": None if self.look is None else self.look.to_json(),
            "short_axis_mm": {
                "prior": rounded(self.short_axis_mm_prior, 2),
                "current": rounded(self.short_axis_mm_current, 2),
                "change_mm": rounded(self.short_axis_change_mm, 2),
                "change_percent": rounded(self.short_axis_change_percent, 1),
            },
            "long_axis_mm": {
                "prior": rounded(self.long_axis_mm_prior, 2),
                "current": rounded(self.long_axis_mm_current, 2),
                "change_mm": rounded(self.long_axis_change_mm, 2),
                "change_percent": rounded(self.long_axis_change_percent, 1),
            },
            "volume_mm3": {
                "prior": rounded(self.volume_mm3_prior, 1),
                "current": rounded(self.volume_mm3_current, 1),
                "change_mm3": rounded(self.volume_change_mm3, 1),
                "change_percent": rounded(self.volume_change_percent, 1),
            },
        }


@dataclass(frozen=True)
class ResponseSummary:
    """The study-level answer: sums and response categories (docs/follow-up-criteria.md)."""

    target_prior_tracking_uids: tuple[str, ...]  # the baseline target nodes (RECIST 1.1)
    sum_short_axis_prior_mm: float  # sum of the target nodes' short axes, prior
    sum_short_axis_current_mm: float  # the same nodes now (a gone target counts 0 mm)
    recist_response: str  # "CR" | "PR" | "SD" | "PD" | "NE" (no target and no non-target node)
    recist_reason: str  # in words, which rule decided
    spd_prior_mm2: float  # sum of products of perpendicular diameters (Lugano), prior
    spd_current_mm2: float  # the same index nodes now (a gone node counts 0)
    new_nodes: int  # nodes counted as unequivocally new (RECIST 1.1)
    target_response: str = ""  # "CR" | "PR" | "SD" | "PD" | "" (no target node)
    non_target_response: str = ""  # "CR" | "non-CR/non-PD" | "" (no non-target node)

    @property
    def sum_short_axis_change_percent(self) -> float | None:
        return _percent(self.sum_short_axis_current_mm, self.sum_short_axis_prior_mm)

    @property
    def spd_change_percent(self) -> float | None:
        return _percent(self.spd_current_mm2, self.spd_prior_mm2)

    def to_json(self) -> dict:
        return {
            "recist_response": self.recist_response,
            "recist_reason": self.recist_reason,
            "target_prior_tracking_uids": list(self.target_prior_tracking_uids),
            "sum_short_axis_mm": {
                "prior": round(self.sum_short_axis_prior_mm, 2),
                "current": round(self.sum_short_axis_current_mm, 2),
                "change_percent": rounded(self.sum_short_axis_change_percent, 1),
            },
            "spd_mm2": {
                "prior": round(self.spd_prior_mm2, 1),
                "current": round(self.spd_current_mm2, 1),
                "change_percent": rounded(self.spd_change_percent, 1),
            },
            "new_nodes": self.new_nodes,
            "target_response": self.target_response,
            "non_target_response": self.non_target_response,
        }


@dataclass(frozen=True)
class Comparison:
    """The current study compared with its prior."""

    prior_study_instance_uid: str
    prior_study_date: str
    prior_source: str
    registration: Registration
    nodes: tuple[NodeChange, ...]
    summary: ResponseSummary
    #: the prior CT series and its frame of reference ("" if unknown): where a gone node was
    prior_series_instance_uid: str = ""
    prior_frame_of_reference_uid: str = ""
    #: what the reader must know about the prior CT (`rules.slice_remarks`, "prior CT: "
    #: before each): slices too far apart for small nodes, so a node called new may be older
    prior_remarks: tuple[str, ...] = ()

    def by_current_label(self) -> dict[str, NodeChange]:
        return {n.current_label: n for n in self.nodes if n.current_label is not None}

    def gone(self) -> tuple[NodeChange, ...]:
        return tuple(n for n in self.nodes if n.status == GONE)

    def with_prior_tracking(self, current: StudyFindings) -> StudyFindings:
        """`current` with each matched node carrying the prior's tracking UID."""
        changes = self.by_current_label()
        findings = []
        for f in current.findings:
            change = changes.get(f.label)
            if change is not None and change.status == MATCHED and change.prior_tracking_uid:
                f = replace(f, tracking_uid=change.prior_tracking_uid)
            findings.append(f)
        return replace(current, findings=tuple(findings))

    def to_json(self) -> dict:
        """What goes into findings.json under ``"comparison"``."""
        return {
            "prior_study_instance_uid": self.prior_study_instance_uid,
            "prior_study_date": self.prior_study_date,
            "prior_source": self.prior_source,
            "registration": self.registration.to_json(),
            "prior_remarks": list(self.prior_remarks),
            "summary": self.summary.to_json(),
            "nodes": [n.to_json() for n in self.nodes],
        }


def prior_nodes(findings: StudyFindings) -> tuple[PriorNode, ...]:
    """The nodes of a fresh analysis of the prior study, as `PriorNode` values."""
    return tuple(
        PriorNode(
            label=f.label,
            tracking_uid=f.tracking_uid,
            centroid_lps_mm=tuple(float(v) for v in f.centroid_lps_mm),  # type: ignore[arg-type]
            short_axis_mm=float(f.short_axis.length_mm),
            long_axis_mm=float(f.long_axis.length_mm),
            volume_mm3=float(f.volume_mm3),
            malignancy_probability=float(f.malignancy_probability),
            at_scan_edge=rules.FLAG_SCAN_EDGE in f.flags,
        )
        for f in findings.findings
    )


def _diff(current: float | None, prior: float | None) -> float | None:
    return None if current is None or prior is None else current - prior


def _percent(current: float | None, prior: float | None) -> float | None:
    if current is None or prior is None or prior == 0:
        return None
    return 100.0 * (current - prior) / prior
