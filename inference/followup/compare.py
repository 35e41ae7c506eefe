"""The comparison of a current study with its prior: register, match, measure, assess."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference import rules
from inference.findings import Finding, Point3, StudyFindings
from inference.followup import matching, response
from inference.followup.look import MEASURED, UNCLEAR, Judge, Look, judged, look_at
from inference.followup.types import (
    GONE,
    MATCHED,
    NEW,
    Comparison,
    FollowUpError,
    FollowUpSettings,
    NodeChange,
    PriorStudy,
    Registration,
)
from inference.volume import Volume

NO_PRIOR_CT = "no prior CT: the centroids are compared unregistered"


def compare(
    prior: PriorStudy,
    current_volume: Volume,
    current: StudyFindings,
    *,
    settings: FollowUpSettings | None = None,
    judge: Judge | None = None,
    registration: Registration | None = None,
) -> Comparison:
    """Register the prior to the current study, match the nodes one to one, and measure
    the changes and the response. `judge`: the model's verdict on what a look at a node's
    place measures (`inference.followup.look.judged`); without it every such structure counts.
    `registration`: one already made for these two studies (a comparison's own), not made again.

    Without `prior.volume` the prior's centroids are used as they are (recorded as an
    ``identity`` registration with its reason). Raises `FollowUpError` on bad input.
    """
    settings = settings or FollowUpSettings()
    _check(prior, current_volume, current)
    if registration is None:
        registration = _registration(prior, current_volume, settings)
    mapped = [registration.map_point(n.centroid_lps_mm) for n in prior.nodes]
    pairs = matching.match(
        mapped,
        [n.long_axis_mm for n in prior.nodes],
        [f.centroid_lps_mm for f in current.findings],
        [f.long_axis.length_mm for f in current.findings],
        settings,
    )
    by_prior = {p: (c, d) for p, c, d in pairs}
    matched_current = {c for _, c, _ in pairs}
    looks = _looks(
        prior, current_volume, current, registration, mapped, by_prior, matched_current, settings, judge
    )
    sizes = []
    for p, node in enumerate(prior.nodes):
        hit = by_prior.get(p)
        f = current.findings[hit[0]] if hit else None
        now = looks.gone.get(p)
        sizes.append(
            response.NodeSizes(
                key=node.tracking_uid,
                sa_prior=node.short_axis_mm,
                la_prior=node.long_axis_mm,
                sa_current=f.short_axis.length_mm if f is not None else _sa(now),
                la_current=f.long_axis.length_mm if f is not None else _la(now),
                unassessed=f is None and now is not None and now.outcome == UNCLEAR,
                looked=f is None and _sa(now) is not None,
                at_scan_edge=node.at_scan_edge,
                at_scan_edge_now=_cut(f) if f is not None else _look_cut(now),
            )
        )
    tissue = looks.tissue
    for c, f in enumerate(current.findings):
        if c not in matched_current:
            then = looks.new.get(c)
            sizes.append(
                response.NodeSizes(
                    key=f.tracking_uid,
                    sa_prior=_sa(then),
                    la_prior=_la(then),
                    sa_current=f.short_axis.length_mm,
                    la_current=f.long_axis.length_mm,
                    seen_before=tissue.get(c, 0.0) > settings.new_node_max_prior_tissue,
                    looked=_sa(then) is not None,
                    at_scan_edge=_look_cut(then),
                    at_scan_edge_now=_cut(f),
                )
            )
    role = response.roles(sizes)
    changes: list[NodeChange] = []
    for c, f in enumerate(current.findings):  # current nodes in their report order
        prior_index = next((p for p, (cc, _) in by_prior.items() if cc == c), None)
        was = None if prior_index is None else prior.nodes[prior_index]
        then = looks.new.get(c)
        changes.append(
            NodeChange(
                status=NEW if was is None else MATCHED,
                current_label=f.label,
                current_tracking_uid=f.tracking_uid,
                prior_label=None if was is None else was.label,
                prior_tracking_uid=None if was is None else was.tracking_uid,
                short_axis_mm_prior=_sa(then) if was is None else was.short_axis_mm,
                short_axis_mm_current=f.short_axis.length_mm,
                long_axis_mm_prior=_la(then) if was is None else was.long_axis_mm,
                long_axis_mm_current=f.long_axis.length_mm,
                volume_mm3_prior=_vol(then) if was is None else was.volume_mm3,
                volume_mm3_current=f.volume_mm3,
                distance_mm=None if prior_index is None else by_prior[prior_index][1],
                recist_role=role.get(f.tracking_uid if was is None else was.tracking_uid, ""),
                prior_centroid_lps_mm=None if was is None else was.centroid_lps_mm,
                current_centroid_lps_mm=f.centroid_lps_mm,
                prior_tissue_share=tissue.get(c),
                seen_in_prior_image=tissue.get(c, 0.0) > settings.new_node_max_prior_tissue,
                look=then,
                prior_at_scan_edge=was.at_scan_edge if was is not None else _look_cut(then),
            )
        )
    for p, node in enumerate(prior.nodes):
        if p not in by_prior:
            now = looks.gone.get(p)
            changes.append(
                NodeChange(
                    status=GONE,
                    current_label=None,
                    current_tracking_uid=None,
                    prior_label=node.label,
                    prior_tracking_uid=node.tracking_uid,
                    short_axis_mm_prior=node.short_axis_mm,
                    short_axis_mm_current=_sa(now),
                    long_axis_mm_prior=node.long_axis_mm,
                    long_axis_mm_current=_la(now),
                    volume_mm3_prior=node.volume_mm3,
                    volume_mm3_current=_vol(now),
                    recist_role=role.get(node.tracking_uid, ""),
                    prior_centroid_lps_mm=node.centroid_lps_mm,
                    current_centroid_lps_mm=mapped[p],
                    look=now,
                    prior_at_scan_edge=node.at_scan_edge,
                )
            )
    return Comparison(
        prior_study_instance_uid=prior.study_instance_uid,
        prior_study_date=prior.study_date,
        prior_source=prior.source,
        registration=registration,
        nodes=tuple(changes),
        summary=response.assess(sizes),
        prior_series_instance_uid=prior.series_instance_uid,
        prior_frame_of_reference_uid=prior.frame_of_reference_uid
        or (prior.volume.frame_of_reference_uid if prior.volume is not None else ""),
        prior_remarks=prior_remarks(prior, current),
    )


def prior_remarks(prior: PriorStudy, current: StudyFindings) -> tuple[str, ...]:
    """The remarks the prior CT calls for, by the current model's limits (none without the
    prior CT): a node the prior's thick slices hid is called new now."""
    if prior.volume is None:
        return ()
    return tuple(
        f"prior CT: {remark}"
        for remark in rules.slice_remarks(
            prior.volume.spacing[0], current.model.max_slice_spacing_mm, prior.volume.slice_thickness_mm
        )
    )


def _cut(f: Finding) -> bool:
    """Whether the current node reaches the edge of the current scan (measured in part)."""
    return rules.FLAG_SCAN_EDGE in f.flags


@dataclass(frozen=True)
class _Looks:
    gone: dict[int, Look]  # prior node index -> the look at its place in the current CT
    new: dict[int, Look]  # current finding index -> the look at its place in the prior CT
    tissue: dict[int, float]  # current finding index (unmatched) -> prior tissue share


def _registration(prior: PriorStudy, current_volume: Volume, settings: FollowUpSettings) -> Registration:
    if prior.volume is None:
        return Registration(method="identity", note="no prior CT: the centroids are compared unregistered")
    from inference.followup.registration import register  # SimpleITK: only when registering

    return register(prior.volume, current_volume, settings)


def _looks(
    prior: PriorStudy,
    current_volume: Volume,
    current: StudyFindings,
    registration: Registration,
    mapped: list[Point3],
    by_prior: dict,
    matched_current: set[int],
    settings: FollowUpSettings,
    judge: Judge | None,
) -> _Looks:
    """Where one study's node has no partner in the other, what its place there holds:
    each gone prior node is looked for in the current CT; each unmatched current node whose
    place was soft tissue on the prior CT is measured there (`inference.followup.look`)."""
    gone: dict[int, Look] = {}
    new: dict[int, Look] = {}
    tissue: dict[int, float] = {}
    for c, f in enumerate(current.findings):
        if c in matched_current or prior.volume is None:
            continue
        tissue[c] = _prior_tissue_share(f, current, prior.volume, registration, settings)
        if settings.look_at_place and tissue[c] > settings.new_node_max_prior_tissue:
            then = look_at(
                prior.volume,
                registration.map_back(f.centroid_lps_mm),
                f.short_axis.length_mm,
                f.long_axis.length_mm,
                settings.soft_tissue_hu,
            )
            new[c] = judged(then, prior.volume, judge)
    if settings.look_at_place:
        for p, node in enumerate(prior.nodes):
            if p not in by_prior:
                now = look_at(
                    current_volume, mapped[p], node.short_axis_mm, node.long_axis_mm, settings.soft_tissue_hu
                )
                gone[p] = judged(now, current_volume, judge)
    return _Looks(gone=gone, new=new, tissue=tissue)


def _look_cut(look: Look | None) -> bool:
    """Whether what a look measured reaches the edge of its scan (measured in part)."""
    return look is not None and look.outcome == MEASURED and look.at_scan_edge


def _sa(look: Look | None) -> float | None:
    return look.short_axis_mm if look is not None and look.outcome == MEASURED else None


def _la(look: Look | None) -> float | None:
    return look.long_axis_mm if look is not None and look.outcome == MEASURED else None


def _vol(look: Look | None) -> float | None:
    return look.volume_mm3 if look is not None and look.outcome == MEASURED else None


def _prior_tissue_share(
    f: Finding, current: StudyFindings, prior: Volume, registration: Registration, settings: FollowUpSettings
) -> float:
    """Share of the node's voxels (at most 4000, evenly picked) whose place in the prior CT,
    through the registration, held soft tissue (HU above `settings.soft_tissue_hu`)."""
    kji = np.argwhere(f.mask) + np.asarray(f.bbox[:3])
    if len(kji) == 0:
        return 0.0
    kji = kji[:: len(kji) // 4000 + 1]
    affine = np.asarray(current.affine, dtype=float)
    lps = kji @ affine[:3, :3].T + affine[:3, 3]
    back = np.linalg.inv(np.asarray(registration.matrix, dtype=float))
    in_prior = lps @ back[:3, :3].T + back[:3, 3]
    prior_affine = np.asarray(prior.affine, dtype=float)
    prior_kji = np.linalg.solve(prior_affine[:3, :3], (in_prior - prior_affine[:3, 3]).T)
    hu = ndimage.map_coordinates(np.asarray(prior.array), prior_kji, order=1, mode="constant", cval=-1000.0)
    return float(np.mean(hu > settings.soft_tissue_hu))


def _check(prior: PriorStudy, current_volume: Volume, current: StudyFindings) -> None:
    if prior.study_instance_uid and prior.study_instance_uid == current.study_instance_uid:
        raise FollowUpError("the prior study is the current study itself (same Study Instance UID)")
    if current_volume.series_instance_uid != current.series_instance_uid:
        raise FollowUpError(
            "the current volume and findings describe different series "
            f"({current_volume.series_instance_uid} != {current.series_instance_uid})"
        )
    uids = [n.tracking_uid for n in prior.nodes]
    if len(set(uids)) != len(uids) or not all(uids):
        raise FollowUpError("every prior node needs its own, non-empty tracking UID")
    for n in prior.nodes:
        if not np.all(np.isfinite(n.centroid_lps_mm)):
            raise FollowUpError(f"prior node {n.label}: centroid is not finite")
        if not (n.short_axis_mm >= 0 and n.long_axis_mm >= 0):
            raise FollowUpError(f"prior node {n.label}: axes must be >= 0 mm")
