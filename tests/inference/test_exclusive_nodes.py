"""Every voxel belongs to at most one node: `inference.nodes.exclusive`."""

from __future__ import annotations

import numpy as np

from inference.nodes import Candidate, exclusive


def _candidate(box, soft_value: float) -> Candidate:
    """A cuboid node `box` (k0, j0, i0, k1, j1, i1 in volume voxels) with a flat probability."""
    k0, j0, i0, k1, j1, i1 = box
    bbox = (k0, j0, i0, k1, j1, i1)
    mask = np.ones((k1 - k0, j1 - j0, i1 - i0), dtype=bool)
    soft = np.full(mask.shape, soft_value, dtype=np.float32)
    return Candidate(mask=mask, bbox=bbox, soft=soft)


def _full(c: Candidate, shape=(20, 20, 20)) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    k0, j0, i0, k1, j1, i1 = c.bbox
    out[k0:k1, j0:j1, i0:i1] = c.mask
    return out


def test_contested_voxels_go_to_the_more_probable_node() -> None:
    a = _candidate((2, 2, 2, 8, 8, 8), 0.7)
    b = _candidate((5, 5, 5, 12, 12, 12), 0.9)
    ea, eb = exclusive([a, b])
    assert eb is b  # the winner is returned as it was
    assert ea is not None and ea is not a
    assert not (_full(ea) & _full(eb)).any()
    assert (_full(ea) | _full(eb)).sum() == (_full(a) | _full(b)).sum()
    # a's probability at the voxels it lost is below 0.5, so diameters on `soft` agree
    lost = _full(a) & ~_full(ea)
    k0, j0, i0 = ea.bbox[:3]
    kji = np.argwhere(lost) - np.array([k0, j0, i0])
    assert np.all(ea.soft[tuple(kji.T)] < 0.5)


def test_a_tie_goes_to_the_earlier_node() -> None:
    a = _candidate((2, 2, 2, 8, 8, 8), 0.8)
    b = _candidate((5, 5, 5, 12, 12, 12), 0.8)
    ea, eb = exclusive([a, b])
    assert ea is a
    assert not _full(eb)[5:8, 5:8, 5:8].any()


def test_three_way_contest_gives_each_voxel_to_one_node() -> None:
    cs = [
        _candidate((0, 0, 0, 10, 10, 10), 0.6),
        _candidate((4, 4, 4, 14, 14, 14), 0.95),
        _candidate((6, 0, 6, 16, 10, 16), 0.8),
    ]
    out = exclusive(cs)
    masks = [_full(c) for c in out if c is not None]
    total = sum(m.astype(int) for m in masks)
    assert total.max() == 1
    assert out[1] is cs[1]


def test_a_node_cut_in_two_keeps_its_largest_piece() -> None:
    a = _candidate((5, 0, 0, 6, 1, 11), 0.6)  # a 1x1x11 rod
    b = _candidate((5, 0, 3, 6, 1, 4), 0.9)  # takes voxel 3: pieces of 3 and 7 voxels
    ea, _ = exclusive([a, b])
    assert int(ea.mask.sum()) == 7
    assert ea.mask[0, 0, 4:].all()


def test_a_node_covered_entirely_is_dropped() -> None:
    a = _candidate((4, 4, 4, 6, 6, 6), 0.6)
    b = _candidate((2, 2, 2, 9, 9, 9), 0.9)
    assert exclusive([a, b]) == [None, b]


def test_disjoint_nodes_are_left_alone() -> None:
    a = _candidate((0, 0, 0, 4, 4, 4), 0.6)
    b = _candidate((4, 4, 4, 8, 8, 8), 0.6)  # boxes touch, masks do not share a voxel
    out = exclusive([a, b])
    assert out[0] is a and out[1] is b
