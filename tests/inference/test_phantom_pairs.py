"""Follow-up phantom pairs (`inference.phantom_pairs`): each change is what the truth says."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from inference import phantom_pairs as pp
from inference.followup.response import CR, PD, PR, SD
from inference.phantoms import PhantomSpec, generate

#: a coarse grid keeps the tests fast; the truth does not depend on it
SPEC = PhantomSpec(rows=160, columns=160, pixel_spacing_mm=2.2, slices=40, slice_spacing_mm=4.0)
SEED = 35  # nodes of 25.0, 21.5 (targets), 14.5 (non-target) and smaller (generator revision 2)
VOXEL_MM3 = 2.2 * 2.2 * 4.0


@pytest.fixture(scope="module")
def pairs() -> dict[str, pp.PhantomPair]:
    return {s: pp.make_pair(SEED, s, SPEC) for s in pp.SCENARIOS}


def test_prior_is_the_phantom_itself(pairs) -> None:
    ph = generate(SEED, SPEC)
    for pair in pairs.values():
        assert np.array_equal(pair.prior.hu, ph.hu)
        assert np.array_equal(pair.prior.labels, ph.labels)


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("progression", PD),
        ("partial-response", PR),
        ("stable", SD),
        ("complete-response", CR),
        ("new-node", PD),
    ],
)
def test_scenarios_reach_their_response(pairs, scenario, expected) -> None:
    assert pairs[scenario].truth_response().recist_response == expected


def test_motion_is_rigid_and_within_limits(pairs) -> None:
    for pair in pairs.values():
        r = pair.motion[:3, :3]
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-9)
        angles = Rotation.from_matrix(r).as_euler("xyz", degrees=True)
        assert abs(angles[2]) <= pp.MAX_ROTATION_DEG + 1e-6
        assert max(abs(angles[0]), abs(angles[1])) <= pp.MAX_TILT_DEG + 1e-6
    shifts = {tuple(np.round(p.motion[:3, 3], 3)) for p in pairs.values()}
    assert len(shifts) == len(pairs)  # each pair its own position


def _region(pair: pp.PhantomPair, index: int):
    kji = np.argwhere(pair.current.labels == index)
    a = pair.current.affine
    lps = kji @ a[:3, :3].T + a[:3, 3]
    return len(kji) * VOXEL_MM3, lps.mean(axis=0)


def test_every_change_is_in_the_image_where_the_truth_says(pairs) -> None:
    statuses = set()
    for pair in pairs.values():
        for fate in pair.nodes:
            statuses.add(fate.status)
            if fate.status == pp.GONE:
                assert fate.current_index is None
                continue
            volume, centre = _region(pair, fate.current_index)
            sa, la = fate.short_axis_mm_current, fate.long_axis_mm_current
            assert sa is not None and la is not None
            node = next(n for n in pair.current.nodes if n.index == fate.current_index)
            assert node.short_axis_mm == pytest.approx(sa)
            assert np.linalg.norm(centre - np.asarray(fate.current_centre_lps_mm)) < 3.0  # a voxel
            if sa >= 8:  # big enough for its voxel count to tell its size
                assert volume == pytest.approx(node.volume_mm3, rel=0.25)
            if fate.status == pp.MATCHED:
                assert fate.scale == pytest.approx(sa / fate.short_axis_mm_prior)
                prior = pair.prior.nodes[fate.prior_index - 1]
                assert la / prior.long_axis_mm == pytest.approx(fate.scale, rel=1e-3)
    assert statuses == {pp.MATCHED, pp.NEW, pp.GONE}


def test_resolved_nodes_are_gone_and_new_nodes_new(pairs) -> None:
    cr = pairs["complete-response"]
    assert all((n.short_axis_mm_current or 0) < 10 for n in cr.nodes)
    new = [n for n in pairs["new-node"].nodes if n.status == pp.NEW]
    assert len(new) == 1 and new[0].short_axis_mm_current >= 15
    assert (pairs["new-node"].current.labels == new[0].current_index).any()


def test_growth_as_claimed(pairs) -> None:
    grown = [n for n in pairs["progression"].nodes if n.status == pp.MATCHED and n.short_axis_mm_prior >= 10]
    assert grown and all(n.scale > 1.0 for n in grown)
    shrunk = [n for n in pairs["partial-response"].nodes if n.status == pp.MATCHED]
    assert all(0.45 <= n.scale <= 0.6 for n in shrunk)


def test_same_inputs_same_pair_and_bad_input() -> None:
    a = pp.make_pair(SEED, "stable", SPEC)
    b = pp.make_pair(SEED, "stable", SPEC)
    assert np.array_equal(a.current.hu, b.current.hu) and np.allclose(a.motion, b.motion)
    with pytest.raises(ValueError, match="unknown scenario"):
        pp.make_pair(SEED, "regression", SPEC)
    assert math.isfinite(a.truth_response().sum_short_axis_prior_mm)


def test_follow_up_holds_only_slices_the_prior_covers(pairs) -> None:
    """Nothing is made up beyond the prior's first and last slice: the follow-up is cut."""
    for pair in pairs.values():
        first, stop = pp.covered_slices(pair.motion, pair.prior.affine, pair.prior.hu.shape)
        assert pair.current.hu.shape == (stop - first, *pair.prior.hu.shape[1:])
        assert stop - first >= pair.prior.hu.shape[0] // 2
        assert np.allclose(
            pair.current.affine[:3, 3], pair.prior.affine[:3, 3] + first * pair.prior.affine[:3, 0]
        )


def test_a_prior_node_cut_by_the_edge_of_the_prior_scan_is_no_target_of_the_truth(pairs) -> None:
    pair = pairs["progression"]
    targets = pair.truth_response().target_prior_tracking_uids
    assert len(targets) == 2
    assert not any(pair.prior_at_scan_edge(f.prior_index) for f in pair.nodes if f.prior_index)
    first = int(targets[0].removeprefix("truth-"))
    index = pair.nodes[first].prior_index
    labels = pair.prior.labels.copy()
    _, j, i = np.argwhere(labels == index)[0]
    labels[0, j, i] = index  # the node now reaches the first slice
    cut = pp.PhantomPair(
        prior=replace(pair.prior, labels=labels),
        current=pair.current,
        motion=pair.motion,
        nodes=pair.nodes,
        scenario=pair.scenario,
    )
    assert cut.prior_at_scan_edge(index)
    assert targets[0] not in cut.truth_response().target_prior_tracking_uids


def test_a_target_cut_by_the_edge_of_the_follow_up_scan_is_not_evaluable_in_the_truth(pairs) -> None:
    pair = pairs["partial-response"]
    truth = pair.truth_response()
    assert truth.target_response == "PR"
    assert not any(pair.current_at_scan_edge(f.current_index) for f in pair.nodes if f.current_index)
    first = pair.nodes[int(truth.target_prior_tracking_uids[0].removeprefix("truth-"))]
    index = first.current_index
    labels = pair.current.labels.copy()
    _, j, i = np.argwhere(labels == index)[0]
    labels[0, j, i] = index  # the node now reaches the first slice of the follow-up
    cut = replace(pair, current=replace(pair.current, labels=labels))
    assert cut.current_at_scan_edge(index)
    sa, la = cut.current_in_view_axes(index)  # measured on its largest axial slice, as a reader would
    assert 0 < sa <= la  # (the test phantom's 2.2 mm pixels measure it only roughly)
    s = cut.truth_response()
    assert s.target_response == "NE" and "cut by the edge of the scan now" in s.recist_reason


def test_a_node_with_a_voxel_in_view_measures_nothing_there(pairs) -> None:
    pair = pairs["partial-response"]
    index = next(f.current_index for f in pair.nodes if f.current_index)
    labels = np.where(pair.current.labels == index, 0, pair.current.labels)
    labels[0, 0, 0] = index  # all that is left of it: one voxel in the corner
    cut = replace(pair, current=replace(pair.current, labels=labels))
    assert cut.current_at_scan_edge(index) and cut.current_in_view_axes(index) == (0.0, 0.0)


def test_the_true_change_of_a_node_cut_by_a_scan_edge_is_that_of_its_part_in_view(pairs) -> None:
    """The comparison measures a cut node's part in view; its true change is scored the same
    way (`nodal evaluate-followup`'s change error), on whichever scan cuts it."""
    pair = pairs["partial-response"]
    fate = next(f for f in pair.nodes if f.prior_index and f.current_index)
    assert pair.true_short_axis_change_mm(fate) == pytest.approx(fate.short_axis_change_mm)
    labels = pair.current.labels.copy()
    _, j, i = np.argwhere(labels == fate.current_index)[0]
    labels[0, j, i] = fate.current_index  # the node now reaches the first slice of the follow-up
    cut = replace(pair, current=replace(pair.current, labels=labels))
    in_view = cut.current_in_view_axes(fate.current_index)[0]
    assert cut.true_short_axis_change_mm(fate) == pytest.approx(in_view - fate.short_axis_mm_prior)
    labels = pair.prior.labels.copy()
    _, j, i = np.argwhere(labels == fate.prior_index)[0]
    labels[0, j, i] = fate.prior_index  # and the prior node the first slice of the prior
    both = replace(cut, prior=replace(pair.prior, labels=labels))
    prior_in_view = pp._in_view_axes(both.prior, fate.prior_index)[0]
    assert both.true_short_axis_change_mm(fate) == pytest.approx(in_view - prior_in_view)
    assert prior_in_view != pytest.approx(fate.short_axis_mm_prior)
    assert pair.true_short_axis_change_mm(replace(fate, prior_index=None, short_axis_mm_prior=None)) is None
