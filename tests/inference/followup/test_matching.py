"""One-to-one, size-gated matching (`inference.followup.matching`)."""

from __future__ import annotations

import pytest

from inference.followup import FollowUpError, FollowUpSettings
from inference.followup.matching import gate_mm, match


def test_nearest_one_to_one_assignment() -> None:
    prior = [(0, 0, 0), (30, 0, 0), (60, 0, 0)]
    current = [(62, 1, 0), (1, 0, 1), (29, -2, 0)]
    pairs = match(prior, [12, 12, 12], current, [12, 12, 12])
    assert [(p, c) for p, c, _ in pairs] == [(0, 1), (1, 2), (2, 0)]
    assert pairs[0][2] == pytest.approx(2**0.5)


def test_unmatched_are_left_out_gone_and_new() -> None:
    pairs = match([(0, 0, 0), (100, 0, 0)], [8, 8], [(2, 0, 0), (0, 80, 0)], [8, 8])
    assert [(p, c) for p, c, _ in pairs] == [(0, 0)]


def test_gate_grows_with_node_size() -> None:
    s = FollowUpSettings()
    assert gate_mm(5, s) == 10.0 and gate_mm(30, s) == 30.0
    # 18 mm apart: too far for small nodes, allowed for a node of 25 mm long axis
    assert match([(0, 0, 0)], [8], [(18, 0, 0)], [8]) == []
    assert len(match([(0, 0, 0)], [25], [(18, 0, 0)], [8])) == 1


def test_global_optimum_not_greedy() -> None:
    # greedy would give prior 0 its nearest (current 0) and leave prior 1 unmatched
    prior = [(0, 0, 0), (9, 0, 0)]
    current = [(5, 0, 0), (-4, 0, 0)]
    pairs = match(prior, [8, 8], current, [8, 8])
    assert [(p, c) for p, c, _ in pairs] == [(0, 1), (1, 0)]


def test_empty_and_bad_input() -> None:
    assert match([], [], [(0, 0, 0)], [5]) == []
    with pytest.raises(FollowUpError, match="finite"):
        match([(float("nan"), 0, 0)], [5], [(0, 0, 0)], [5])
    with pytest.raises(FollowUpError, match="one long axis"):
        match([(0, 0, 0)], [], [(0, 0, 0)], [5])
    with pytest.raises(FollowUpError, match="gate_min_mm"):
        FollowUpSettings(gate_min_mm=0)
    with pytest.raises(FollowUpError, match="registration"):
        FollowUpSettings(registration="elastic")
