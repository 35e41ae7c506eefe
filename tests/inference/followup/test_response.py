"""RECIST 1.1 nodal response and Lugano SPD on hand-made cases (`inference.followup.response`)."""

from __future__ import annotations

import pytest

from inference.followup import FollowUpError
from inference.followup.response import CR, NE, NON_CR_NON_PD, PD, PR, SD, NodeSizes, assess, roles


def node(key, sa0, sa1, la0=None, la1=None) -> NodeSizes:
    return NodeSizes(
        key=key,
        sa_prior=sa0,
        la_prior=None if sa0 is None else (la0 if la0 is not None else sa0 * 1.3),
        sa_current=sa1,
        la_current=None if sa1 is None else (la1 if la1 is not None else sa1 * 1.3),
    )


def test_roles_two_largest_targets_then_non_target_and_normal() -> None:
    r = roles([node("a", 16, 16), node("b", 30, 30), node("c", 20, 20), node("d", 12, 12), node("e", 9.9, 9)])
    assert r == {"b": "target", "c": "target", "a": "non-target", "d": "non-target", "e": "normal"}
    assert roles([node("x", 15.0, 15.0)]) == {"x": "target"}  # >= 15 mm is a target
    assert roles([node("y", 14.99, 15.0)]) == {"y": "non-target"}
    assert roles([node("z", 10.0, 1.0)]) == {"z": "non-target"}  # >= 10 mm is pathological


def test_complete_response_all_targets_below_10mm() -> None:
    s = assess([node("a", 20, 9.9), node("b", 16, None)])  # a gone target counts 0 mm
    assert s.recist_response == CR
    assert s.sum_short_axis_prior_mm == 36 and s.sum_short_axis_current_mm == pytest.approx(9.9)


def test_targets_cr_with_pathological_non_target_is_pr() -> None:
    assert assess([node("a", 20, 8), node("b", 12, 11)]).recist_response == PR


def test_partial_response_at_exactly_30_percent() -> None:
    assert assess([node("a", 20, 14), node("b", 20, 14)]).recist_response == PR  # -30.0 %
    assert assess([node("a", 20, 14.1), node("b", 20, 14)]).recist_response == SD  # -29.75 %


def test_progression_needs_20_percent_and_5_mm() -> None:
    assert assess([node("a", 20, 24), node("b", 20, 24)]).recist_response == PD  # +20 %, +8 mm
    assert assess([node("a", 20, 23.9), node("b", 20, 24)]).recist_response == SD  # +19.75 %
    # +20 % but only +4 mm absolute: stable (the 5 mm floor)
    assert assess([node("a", 20, 24)]).recist_response == SD
    assert assess([node("a", 25, 30)]).recist_response == PD  # +20 %, +5 mm


def test_new_node_of_15mm_is_progression_10_to_15_is_equivocal() -> None:
    s = assess([node("a", 20, 20), node("new", None, 15.0)])
    assert s.recist_response == PD and s.new_nodes == 1
    s = assess([node("a", 20, 20), node("new", None, 12.0)])
    assert s.recist_response == SD and s.new_nodes == 0 and "equivocal" in s.recist_reason
    assert assess([node("a", 20, 20), node("new", None, 9.0)]).recist_response == SD


def test_without_targets_non_targets_decide_and_nothing_is_ne() -> None:
    assert assess([node("a", 12, 8)]).recist_response == CR
    assert assess([node("a", 12, 12)]).recist_response == NON_CR_NON_PD
    assert assess([node("a", 6, 6)]).recist_response == NE
    assert assess([node("a", 6, 6), node("n", None, 18)]).recist_response == PD


def test_spd_lugano_six_largest_products_of_measurable_nodes() -> None:
    nodes = [node(f"n{i}", 10 + i, 10 + i, la0=20 + i, la1=20 + i) for i in range(8)]
    nodes.append(node("short", 12, 12, la0=15.0, la1=15.0))  # long axis not > 15 mm: not measurable
    s = assess(nodes)
    expected = sum((10 + i) * (20 + i) for i in range(2, 8))
    assert s.spd_prior_mm2 == pytest.approx(expected)
    assert s.spd_current_mm2 == pytest.approx(expected)
    shrunk = assess([node("a", 20, 10, la0=30, la1=15)])
    assert shrunk.spd_prior_mm2 == 600 and shrunk.spd_current_mm2 == 150
    assert shrunk.spd_change_percent == pytest.approx(-75.0)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(FollowUpError, match="absent at both"):
        NodeSizes("x", None, None, None, None)
    with pytest.raises(FollowUpError, match=">= 0"):
        NodeSizes("x", -1.0, 2.0, 1.0, 1.0)
    with pytest.raises(FollowUpError, match="both be given"):
        NodeSizes("x", 1.0, None, 1.0, 1.0)
    with pytest.raises(FollowUpError, match="duplicate"):
        assess([node("a", 20, 20), node("a", 12, 12)])


def _unassessed(key, sa0) -> NodeSizes:
    return NodeSizes(
        key=key, sa_prior=sa0, la_prior=sa0 * 1.3, sa_current=None, la_current=None, unassessed=True
    )


def test_a_target_not_measurable_now_makes_the_targets_not_evaluable() -> None:
    """Not found by the model, soft tissue still at its place: no CR or PR can be claimed."""
    s = assess([node("a", 20, 5), _unassessed("b", 18)])
    assert s.target_response == NE and s.recist_response == NE
    assert "not evaluable" in s.recist_reason
    assert assess([node("a", 20, 5), node("b", 18, None)]).recist_response == CR  # truly gone: 0 mm


def test_progression_stands_even_with_a_target_not_measurable() -> None:
    s = assess([node("a", 20, 40), _unassessed("b", 16)])  # +4 mm with b at 0 mm: not PD
    assert s.recist_response == NE
    s = assess([node("a", 20, 50), _unassessed("b", 16)])  # +14 mm (39 %) with b at 0 mm
    assert s.recist_response == PD


def test_a_non_target_not_measurable_now_is_no_complete_response() -> None:
    s = assess([node("a", 20, 5), _unassessed("b", 12)])
    assert s.target_response == CR and s.non_target_response == NON_CR_NON_PD
    assert s.recist_response == PR


def test_an_unassessed_node_has_no_current_size() -> None:
    with pytest.raises(FollowUpError, match="unassessed"):
        NodeSizes(key="a", sa_prior=12, la_prior=14, sa_current=5, la_current=6, unassessed=True)


def test_a_node_cut_by_the_edge_of_the_baseline_scan_is_no_target() -> None:
    cut = NodeSizes(key="cut", sa_prior=30, la_prior=40, sa_current=10, la_current=14, at_scan_edge=True)
    r = roles([cut, node("b", 20, 20), node("c", 16, 16)])
    assert r == {"cut": "non-target", "b": "target", "c": "target"}  # the next largest take its place
    small = NodeSizes(key="s", sa_prior=8, la_prior=9, sa_current=8, la_current=9, at_scan_edge=True)
    assert roles([small]) == {"s": "normal"}
    # alone, a cut node of 30 mm that shrank by two thirds gives no target response
    s = assess([cut])
    assert s.target_prior_tracking_uids == () and s.target_response == ""
    assert s.recist_response == NON_CR_NON_PD


def _cut_now(key, sa0, sa1) -> NodeSizes:
    return NodeSizes(
        key=key, sa_prior=sa0, la_prior=sa0 * 1.3, sa_current=sa1, la_current=sa1 * 1.3, at_scan_edge_now=True
    )


def test_a_target_cut_by_the_edge_of_the_current_scan_is_not_evaluable() -> None:
    # the part in view measures 6 mm: without the rule, both targets < 10 mm would be CR
    s = assess([node("a", 20, 5), _cut_now("b", 18, 6)])
    assert s.target_response == NE and s.recist_response == NE
    assert "cut by the edge of the scan now" in s.recist_reason
    # progression stands on the part in view alone: 20 + 18 -> 20 + 30 (+12 mm, 32 %)
    s = assess([node("a", 20, 20), _cut_now("b", 18, 30)])
    assert s.target_response == PD and s.recist_response == PD


def test_a_non_target_cut_by_the_edge_of_the_current_scan_is_not_called_normal() -> None:
    s = assess([node("a", 20, 5), _cut_now("b", 12, 4)])
    assert s.target_response == CR and s.non_target_response == NON_CR_NON_PD
    assert s.recist_response == PR  # targets CR with non-targets present


def test_a_node_cut_now_has_a_current_size() -> None:
    with pytest.raises(FollowUpError, match="edge of the scan now"):
        NodeSizes(key="a", sa_prior=12, la_prior=14, sa_current=None, la_current=None, at_scan_edge_now=True)
