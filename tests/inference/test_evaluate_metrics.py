"""The evaluation's own arithmetic: AUC and detection matching."""

import numpy as np
import pytest

from inference.evaluate import auc, match


def test_auc():
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([0.3, 0.4], [True, True]) is None


def test_match_counts_overlap_and_false_positives():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    hit = np.ones((3, 3, 3), bool)
    miss = np.ones((2, 2, 2), bool)
    out = match(labels, [((2, 2, 2, 5, 5, 5), hit), ((7, 7, 7, 9, 9, 9), miss)])
    assert out[0].gt == 1 and out[0].dice == pytest.approx(1.0)
    assert out[1].gt == 0


def test_a_finding_mostly_of_other_tissue_is_a_false_positive_not_the_node():
    """A bowel loop segmented with a small node on its wall: the node lies wholly inside the
    finding, but the two have an intersection over union of 0.05, so the evaluations count
    a false positive (and the node missed); the training labels keep the old rule."""
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:5, 2:5, 2:5] = 1  # 27 voxels
    loop = np.ones((8, 8, 8), bool)  # 512 voxels, the node in its corner
    [m] = match(labels, [((2, 2, 2, 10, 10, 10), loop)])
    assert m.gt == 0
    [m] = match(labels, [((2, 2, 2, 10, 10, 10), loop)], training=True)
    assert m.gt == 1
    half = np.ones((4, 4, 4), bool)  # a node measured too large: IoU 27/64
    [m] = match(labels, [((2, 2, 2, 6, 6, 6), half)])
    assert m.gt == 1


def test_bias_keeps_the_sign_that_the_absolute_error_loses():
    from inference.evaluate import _bias, _mae

    pairs = [(9.0, 10.0), (9.5, 10.0), (11.0, 10.0)]
    assert _bias(pairs) == pytest.approx(-0.1667, abs=1e-4)
    assert _mae(pairs) == pytest.approx(0.8333, abs=1e-4)
    assert _bias([]) is None


def test_a_node_found_twice_counts_once_and_the_second_finding_is_a_duplicate():
    from inference.evaluate import _Match, best_per_node

    pairs = [("a", _Match(1, 0.6)), ("b", _Match(1, 0.8)), ("c", _Match(2, 0.5)), ("d", _Match(0, 0.0))]
    best = best_per_node(pairs)
    assert {n: f for n, (f, _) in best.items()} == {1: "b", 2: "c"}
    assert sum(m.gt != 0 for _, m in pairs) - len(best) == 1  # "a" reports node 1 again


def test_found_nodes_are_counted_per_recist_size_class():
    from types import SimpleNamespace

    from inference.evaluate import found_by_size
    from inference.rules import SIZE_NON_TARGET, SIZE_NORMAL, SIZE_TARGET

    def node(short_mm):
        return SimpleNamespace(short_axis_mm=short_mm)

    sizes_found = [(4.0, False), (5.0, True), (9.9, False), (10.0, True), (22.0, False)]
    rows = [(node(mm), found) for mm, found in sizes_found]
    # the 4 mm node is under the sensitivity's 5 mm and counted nowhere
    assert found_by_size(rows) == {SIZE_NORMAL: [1, 2], SIZE_NON_TARGET: [1, 1], SIZE_TARGET: [0, 1]}


def test_each_rule_alone_counts_the_false_positives_it_removes_and_the_nodes_it_loses_per_size():
    from types import SimpleNamespace

    from inference import plausibility
    from inference.evaluate import _Match, rule_effects
    from inference.rules import SIZE_NON_TARGET, SIZE_NORMAL, SIZE_TARGET

    def node(index, short_mm):
        return SimpleNamespace(
            index=index,
            short_axis_mm=short_mm,
            long_axis_mm=short_mm,
            volume_mm3=short_mm**3,
            malignant_criterion=False,
        )

    def finding(short_mm):
        axis = SimpleNamespace(length_mm=short_mm)
        return SimpleNamespace(
            short_axis=axis, long_axis=axis, volume_mm3=short_mm**3, malignancy_probability=0.5
        )

    def breaks(*names):
        return {r: r in names for r in plausibility.RULES}

    nodes = [node(1, 6.0), node(2, 20.0), node(3, 12.0)]
    findings = [finding(6.0), finding(20.0), finding(8.0), finding(12.0), finding(12.0)]
    matches = [_Match(1, 0.9), _Match(2, 0.9), _Match(0, 0.0), _Match(3, 0.9), _Match(3, 0.5)]
    verdicts = [
        breaks("tube_inplane"),  # loses the 6 mm node
        breaks(),
        breaks("elongation", "tube_inplane"),  # a false positive both remove
        breaks("tube_inplane"),  # the 12 mm node's best finding; its duplicate keeps it found
        breaks(),
    ]
    effects = rule_effects([(nodes, findings, matches, verdicts)], applied=("elongation", "tube_inplane"))
    none_by_size = {SIZE_NORMAL: 0, SIZE_NON_TARGET: 0, SIZE_TARGET: 0}
    assert effects["tube_inplane"] == {
        "fp_removed": 1,
        "nodes_lost": 1,
        "nodes_lost_by_size": {SIZE_NORMAL: 1, SIZE_NON_TARGET: 0, SIZE_TARGET: 0},
        # on top of elongation, which rejects the false positive too: taking it out brings
        # back the 6 mm node and no false positive
        "marginal": {
            "fp_removed": 0,
            "nodes_lost": 1,
            "nodes_lost_by_size": {SIZE_NORMAL: 1, SIZE_NON_TARGET: 0, SIZE_TARGET: 0},
        },
    }
    assert effects["elongation"]["fp_removed"] == 1 and effects["elongation"]["nodes_lost"] == 0
    assert effects["elongation"]["marginal"] == {
        "fp_removed": 0,
        "nodes_lost": 0,
        "nodes_lost_by_size": none_by_size,
    }
    assert effects["size"] == {
        "fp_removed": 0,
        "nodes_lost": 0,
        "nodes_lost_by_size": none_by_size,
    }  # not applied
