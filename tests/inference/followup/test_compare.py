"""The comparison (`inference.followup.compare`): statuses, changes, tracking, JSON, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from inference import rules
from inference.evaluate import array_volume
from inference.followup import (
    FROM_ANALYSIS,
    GONE,
    MATCHED,
    NEW,
    FollowUpError,
    FollowUpSettings,
    PriorNode,
    PriorStudy,
    compare,
    prior_nodes,
)
from inference.followup.compare import prior_remarks
from sr_templates.synthetic import ellipsoid_finding, study_findings

SHAPE = (40, 96, 96)
SPACING = 2.0


def _affine() -> np.ndarray:
    a = np.eye(4)  # (k, j, i) -> (x = i, y = j, z = k) in mm
    a[:3, 0], a[:3, 1], a[:3, 2] = (0, 0, SPACING), (0, SPACING, 0), (SPACING, 0, 0)
    return a


def _findings(key: str, nodes):
    """StudyFindings with ellipsoids (label, centre kji, radii mm k/j/i) on the test grid."""
    volume = array_volume(np.zeros(SHAPE, np.float32), _affine(), "compare-test", key)
    findings = [
        ellipsoid_finding(
            label=label,
            tracking_uid=f"2.25.{1000 + len(key)}{label[3:]}",
            shape=SHAPE,
            affine=_affine(),
            center_kji=c,
            radii_mm=r,
        )
        for label, c, r in nodes
    ]
    sf = study_findings(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        slices=volume.slices,
        shape=SHAPE,
        affine=_affine(),
        findings=findings,
    )
    return volume, sf


@pytest.fixture(scope="module")
def studies():
    _, prior = _findings(
        "prior",
        [
            ("LN-1", (20, 30, 30), (10, 10, 14)),  # a target (20 mm short axis), grows
            ("LN-2", (20, 70, 70), (6, 6, 8)),  # non-target 12 mm, gone
            ("LN-3", (10, 30, 70), (4, 4, 5)),  # normal, stays
        ],
    )
    current_volume, current = _findings(
        "current",
        [
            ("LN-1", (21, 31, 30), (13, 13, 16)),  # moved 2-3 mm, 26 mm short axis
            ("LN-2", (30, 60, 20), (9, 9, 10)),  # new, 18 mm
            ("LN-3", (10, 31, 71), (4, 4, 5)),
        ],
    )
    study = PriorStudy(
        study_instance_uid=prior.study_instance_uid,
        series_instance_uid=prior.series_instance_uid,
        study_date="20260105",
        nodes=prior_nodes(prior),
        volume=None,
        source=FROM_ANALYSIS,
    )
    return study, prior, current_volume, current


def test_statuses_changes_and_response(studies) -> None:
    study, prior, current_volume, current = studies
    comparison = compare(study, current_volume, current)
    assert comparison.registration.method == "identity" and "no prior CT" in comparison.registration.note
    by_status = {n.status: [] for n in comparison.nodes}
    for n in comparison.nodes:
        by_status[n.status].append(n)
    assert {n.current_label for n in by_status[MATCHED]} == {"LN-1", "LN-3"}
    assert [n.current_label for n in by_status[NEW]] == ["LN-2"]
    assert [n.prior_label for n in by_status[GONE]] == ["LN-2"]
    grown = next(n for n in comparison.nodes if n.current_label == "LN-1")
    assert grown.prior_tracking_uid == prior.findings[0].tracking_uid
    assert grown.short_axis_change_mm == pytest.approx(6.0, abs=0.5)
    assert grown.short_axis_change_percent == pytest.approx(30.0, abs=3)
    assert grown.volume_change_mm3 > 0 and grown.recist_role == "target"
    gone = by_status[GONE][0]
    assert gone.short_axis_mm_current is None and gone.recist_role == "non-target"
    s = comparison.summary
    assert s.recist_response == "PD" and s.new_nodes == 1  # +30 % and +6 mm, and a new 18 mm node
    assert s.target_prior_tracking_uids == (prior.findings[0].tracking_uid,)
    assert s.spd_prior_mm2 > 0 and s.spd_current_mm2 > s.spd_prior_mm2


def test_matched_nodes_take_the_prior_tracking_uid(studies) -> None:
    study, prior, current_volume, current = studies
    comparison = compare(study, current_volume, current)
    tracked = comparison.with_prior_tracking(current)
    uids = {f.label: f.tracking_uid for f in tracked.findings}
    assert uids["LN-1"] == prior.findings[0].tracking_uid
    assert uids["LN-3"] == prior.findings[2].tracking_uid
    assert uids["LN-2"] == current.findings[1].tracking_uid  # new: its own
    assert tracked.findings[0].short_axis == current.findings[0].short_axis


def test_json_is_plain_and_complete(studies) -> None:
    study, _, current_volume, current = studies
    data = compare(study, current_volume, current).to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["prior_study_date"] == "20260105" and data["prior_source"] == "analysed"
    assert data["summary"]["recist_response"] == "PD"
    assert {n["status"] for n in data["nodes"]} == {"matched", "new", "gone"}
    node = data["nodes"][0]
    assert set(node["short_axis_mm"]) == {"prior", "current", "change_mm", "change_percent"}


def test_deterministic(studies) -> None:
    study, _, current_volume, current = studies
    assert compare(study, current_volume, current) == compare(study, current_volume, current)


def test_bad_input_is_a_clear_error(studies) -> None:
    study, prior, current_volume, current = studies
    same = PriorStudy(current.study_instance_uid, "", "", study.nodes)
    with pytest.raises(FollowUpError, match="current study itself"):
        compare(same, current_volume, current)
    twice = PriorStudy("1.2.3", "", "", (study.nodes[0], study.nodes[0]))
    with pytest.raises(FollowUpError, match="own, non-empty tracking UID"):
        compare(twice, current_volume, current)
    nan = PriorNode("LN-9", "1.2.9", (float("nan"), 0.0, 0.0), 10.0, 12.0, None)
    with pytest.raises(FollowUpError, match="not finite"):
        compare(PriorStudy("1.2.3", "", "", (nan,)), current_volume, current)
    with pytest.raises(FollowUpError, match="different series"):
        compare(PriorStudy("1.2.3", "", "", study.nodes), current_volume, prior)


@pytest.mark.parametrize(("there_before", "new_lesions"), [(False, 1), (True, 0)])
def test_a_new_node_already_visible_on_the_prior_ct_is_no_new_lesion(
    studies, there_before, new_lesions
) -> None:
    """The prior's analysis missed a node that the prior CT shows: it is not a new lesion."""
    study, _, current_volume, current = studies
    prior_array = np.full(SHAPE, -100.0, np.float32)  # fat
    if there_before:
        new = next(f for f in current.findings if f.label == "LN-2")
        k0, j0, i0, k1, j1, i1 = new.bbox
        prior_array[k0:k1, j0:j1, i0:i1][new.mask] = 45.0  # the node, unseen by the analysis
    prior_volume = array_volume(prior_array, _affine(), "compare-test", "prior")
    with_ct = PriorStudy(study.study_instance_uid, "", "", study.nodes, volume=prior_volume)
    comparison = compare(with_ct, current_volume, current)
    assert comparison.registration.method == "identity"  # no bone: the registration says why
    assert comparison.registration.note
    node = next(n for n in comparison.nodes if n.status == NEW)
    assert node.seen_in_prior_image is there_before
    assert node.prior_tissue_share == pytest.approx(1.0 if there_before else 0.0, abs=0.05)
    assert comparison.summary.new_nodes == new_lesions
    if there_before:  # looked for on the prior CT, and measured there: it has a baseline
        assert node.look is not None and node.look.outcome == "measured"
        assert node.short_axis_mm_prior == pytest.approx(node.short_axis_mm_current, abs=1.5)
        assert node.recist_role == "target"  # 18 mm at baseline
        assert "measured at their place" in comparison.summary.recist_reason
        without = compare(with_ct, current_volume, current, settings=FollowUpSettings(look_at_place=False))
        assert "already visible on the prior CT" in without.summary.recist_reason
        assert next(n for n in without.nodes if n.status == NEW).look is None
    else:
        assert node.look is None and node.short_axis_mm_prior is None


def test_a_registration_given_is_used_and_not_made_again(studies, monkeypatch) -> None:
    """`nodal evaluate-followup` compares each pair three ways: the registration made for
    the first comparison is handed to the others."""
    import inference.followup.registration as reg

    study, _, current_volume, current = studies
    prior_volume = array_volume(np.full(SHAPE, -100.0, np.float32), _affine(), "compare-test", "prior")
    with_ct = PriorStudy(study.study_instance_uid, "", "", study.nodes, volume=prior_volume)
    first = compare(with_ct, current_volume, current)
    given = replace(first.registration, note="handed over")
    monkeypatch.setattr(reg, "register", lambda *a, **k: pytest.fail("registered again"))
    again = compare(with_ct, current_volume, current, registration=given)
    assert again.registration is given
    assert again.nodes == first.nodes and again.summary == first.summary


@pytest.mark.parametrize("now", ["fat", "measured", "unclear", "look-alike"])
def test_a_gone_node_is_looked_for_at_its_place_on_the_current_ct(studies, now) -> None:
    """The model did not find prior LN-2 now; its place on the current CT decides its size;
    what the look measures there, the model's judge (its checker) may refuse."""
    study, prior, _, current = studies
    array = np.full(SHAPE, -100.0, np.float32)
    for f in current.findings:  # the current CT shows what the analysis found ...
        k0, j0, i0, k1, j1, i1 = f.bbox
        array[k0:k1, j0:j1, i0:i1][f.mask] = 45.0
    gone = next(f for f in prior.findings if f.label == "LN-2")
    k0, j0, i0, k1, j1, i1 = gone.bbox
    if now in ("measured", "look-alike"):  # ... and prior LN-2, shrunk to two thirds, which it missed
        shrunk = np.zeros_like(gone.mask)
        grid = np.indices(gone.mask.shape)
        centre = np.argwhere(gone.mask).mean(axis=0)
        shrunk[np.sum(((grid - centre[:, None, None, None]) * SPACING / 4.0) ** 2, axis=0) <= 1.0] = True
        array[k0:k1, j0:j1, i0:i1][shrunk] = 45.0
    if now == "unclear":  # ... or a band of soft tissue through its place
        array[:, j0 + 2 : j1 - 2, :] = 40.0
    current_volume = array_volume(array, _affine(), "compare-test", "current")
    judged = []

    def judge(volume, structure, origin, short_mm, long_mm) -> bool:
        judged.append((volume, structure, origin, short_mm))
        return now != "look-alike"

    comparison = compare(study, current_volume, current, judge=judge)
    node = next(n for n in comparison.nodes if n.status == GONE)
    if now in ("measured", "look-alike"):  # the judge saw the structure the look measured
        [(volume, structure, origin, short_mm)] = judged
        assert volume is current_volume and short_mm == pytest.approx(8.0, abs=2.5)
        where = np.zeros(SHAPE, bool)
        where[tuple(slice(o, o + n) for o, n in zip(origin, structure.shape, strict=True))] = structure
        assert where[k0:k1, j0:j1, i0:i1][shrunk].mean() > 0.8 and where.sum() < 1.5 * shrunk.sum()
    else:
        assert not judged
    assert node.look is not None and node.look.outcome == now
    if now == "measured":
        assert node.short_axis_mm_current == pytest.approx(8.0, abs=2.5)
        assert node.short_axis_change_mm < 0
    else:
        assert node.short_axis_mm_current is None
    assert node.to_json()["look"]["outcome"] == now
    non_target = comparison.summary.non_target_response
    assert non_target == ("non-CR/non-PD" if now == "unclear" else "CR")


def test_a_prior_node_cut_by_the_edge_of_the_prior_scan_is_no_target(studies) -> None:
    study, _, current_volume, current = studies
    cut = replace(study, nodes=(replace(study.nodes[0], at_scan_edge=True), *study.nodes[1:]))
    comparison = compare(cut, current_volume, current)
    grown = next(n for n in comparison.nodes if n.current_label == "LN-1")
    assert grown.prior_at_scan_edge and grown.recist_role == "non-target"
    assert comparison.summary.target_prior_tracking_uids == ()
    assert comparison.to_json()["nodes"][0]["prior_at_scan_edge"] is True


def test_prior_nodes_carry_the_scan_edge_flag() -> None:
    _, prior = _findings("edge", [("LN-1", (0.5, 30, 30), (6, 6, 8)), ("LN-2", (20, 60, 60), (6, 6, 8))])
    flagged = replace(prior.findings[0], flags=(rules.FLAG_SCAN_EDGE,))
    nodes = prior_nodes(replace(prior, findings=(flagged, prior.findings[1])))
    assert [n.at_scan_edge for n in nodes] == [True, False]


def test_a_target_cut_by_the_edge_of_the_current_scan_is_not_evaluable() -> None:
    _, prior = _findings("cut-prior", [("LN-1", (20, 30, 30), (10, 10, 14))])  # a 20 mm target
    current_volume, current = _findings("cut-current", [("LN-1", (20, 31, 30), (3, 3, 4))])  # 6 mm now
    study = PriorStudy(
        study_instance_uid=prior.study_instance_uid,
        series_instance_uid=prior.series_instance_uid,
        study_date="20260105",
        nodes=prior_nodes(prior),
    )
    assert compare(study, current_volume, current).summary.recist_response == "CR"
    cut = replace(current.findings[0], flags=(*current.findings[0].flags, rules.FLAG_SCAN_EDGE))
    s = compare(study, current_volume, replace(current, findings=(cut,))).summary
    assert s.recist_response == "NE" and "cut by the edge of the scan now" in s.recist_reason


def test_a_gone_target_measured_at_its_place_against_the_scan_edge_is_not_evaluable() -> None:
    """The look measures what lies at a missed target's place; where that reaches the edge of
    the current scan it is measured in part, as the model's own cut node would be."""
    _, prior = _findings("look-cut-prior", [("LN-1", (20, 30, 7), (10, 14, 10))])  # 20 mm target
    study = PriorStudy(prior.study_instance_uid, "", "20260105", prior_nodes(prior))
    _, current = _findings("look-cut-current", [])  # the model found nothing now
    g = np.indices(SHAPE).astype(float) * SPACING
    # a 16 mm node at its place, then a 20 mm one reaching the first column
    for centre_i, radius_mm, cut in ((7, 8.0, False), (4, 10.0, True)):
        array = np.full(SHAPE, -100.0, np.float32)
        c = np.array([20, 30, centre_i]) * SPACING
        array[sum((g[a] - c[a]) ** 2 for a in range(3)) <= radius_mm**2] = 45.0
        volume = array_volume(array, _affine(), "compare-test", "look-cut-current")
        comparison = compare(study, volume, current)
        [gone] = comparison.nodes
        assert gone.look is not None and gone.look.outcome == "measured" and gone.look.at_scan_edge is cut
        assert gone.short_axis_mm_current is not None and gone.short_axis_mm_current > 10.0
        assert comparison.summary.recist_response == ("NE" if cut else "SD")


def test_a_prior_ct_on_slices_too_far_apart_is_said_so(studies) -> None:
    """A node the prior's thick slices hid is called new now: the comparison says so when
    the prior CT's slices lie further apart than the current model finds small nodes on."""
    study, _, current_volume, current = studies
    prior_ct, _ = _findings("prior", [])  # slices 2 mm apart
    limited = replace(current, model=replace(current.model, max_slice_spacing_mm=1.5))
    with_ct = replace(study, volume=prior_ct)
    assert prior_remarks(with_ct, limited) == (
        "prior CT: thick slices (2.0 mm apart, over 1.5): small nodes may be missed",
    )
    assert (
        prior_remarks(with_ct, replace(current, model=replace(current.model, max_slice_spacing_mm=2.0))) == ()
    )
    assert (
        prior_remarks(with_ct, replace(current, model=replace(current.model, max_slice_spacing_mm=None)))
        == ()
    )
    assert prior_remarks(study, limited) == ()  # no prior CT: nothing known of its slices
    assert compare(study, current_volume, limited).to_json()["prior_remarks"] == []
