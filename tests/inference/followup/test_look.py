"""The look at a node's place in the other study (`inference.followup.look`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference import rules
from inference.evaluate import array_volume
from inference.followup.look import FAT, MEASURED, UNCLEAR, look_at

SHAPE = (48, 96, 96)
SPACING = (2.0, 0.8, 0.8)  # k (z), j (y), i (x) in mm
FAT_HU, NODE_HU = -100.0, 45.0


def _affine() -> np.ndarray:
    a = np.eye(4)  # (k, j, i) -> (x = i, y = j, z = k) in mm
    a[:3, 0], a[:3, 1], a[:3, 2] = (0, 0, SPACING[0]), (0, SPACING[1], 0), (SPACING[2], 0, 0)
    return a


def _mm(kji) -> np.ndarray:
    return np.asarray(kji, float) * np.asarray(SPACING)


def _grid_mm() -> np.ndarray:
    return np.indices(SHAPE).astype(np.float32) * np.asarray(SPACING, np.float32)[:, None, None, None]


def _volume(array: np.ndarray):
    return array_volume(array.astype(np.float32), _affine(), "look-test", str(abs(hash(array.tobytes()))))


def _place(centre_kji) -> tuple[float, float, float]:
    z, y, x = _mm(centre_kji)
    return (float(x), float(y), float(z))


def _ball(centre_kji, radius_mm: float) -> np.ndarray:
    g = _grid_mm()
    c = _mm(centre_kji)
    return sum((g[a] - c[a]) ** 2 for a in range(3)) <= radius_mm**2


CENTRE = (24, 48, 48)


def test_a_node_in_fat_is_measured() -> None:
    array = np.full(SHAPE, FAT_HU)
    array[_ball(CENTRE, 8.0)] = NODE_HU
    look = look_at(_volume(array), _place(CENTRE), 12.0, 14.0)
    assert look.outcome == MEASURED
    assert look.short_axis_mm == pytest.approx(16.0, abs=1.0)
    assert look.long_axis_mm == pytest.approx(16.0, abs=1.0)
    assert look.volume_mm3 == pytest.approx(4 / 3 * math.pi * 8.0**3, rel=0.15)


def test_fat_at_the_place_is_fat() -> None:
    array = np.full(SHAPE, FAT_HU)
    array[_ball((24, 20, 20), 5.0)] = NODE_HU  # another node, elsewhere
    look = look_at(_volume(array), _place(CENTRE), 12.0, 14.0)
    assert look.outcome == FAT and look.soft_tissue_share == pytest.approx(0.0)


def test_a_necrotic_core_and_a_fatty_hilum_are_inside_the_node() -> None:
    array = np.full(SHAPE, FAT_HU)
    array[_ball(CENTRE, 9.0)] = NODE_HU
    array[_ball(CENTRE, 4.0)] = -60.0  # below the soft-tissue threshold, inside the node
    look = look_at(_volume(array), _place(CENTRE), 18.0, 18.0)
    assert look.outcome == MEASURED
    assert look.short_axis_mm == pytest.approx(18.0, abs=1.0)
    assert look.volume_mm3 == pytest.approx(4 / 3 * math.pi * 9.0**3, rel=0.15)


def test_a_long_tube_through_the_place_is_unclear() -> None:
    """A bowel loop or vessel cut by the place continues: not measurable as a node."""
    array = np.full(SHAPE, FAT_HU)
    g = _grid_mm()
    c = _mm(CENTRE)
    array[(g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2 <= 8.0**2] = 40.0  # along z, through the scan
    look = look_at(_volume(array), _place(CENTRE), 14.0, 16.0)
    assert look.outcome == UNCLEAR and "without a neck" in look.note
    assert look.short_axis_mm is None


def test_a_thin_strand_to_a_neighbour_is_cut() -> None:
    array = np.full(SHAPE, FAT_HU)
    array[_ball(CENTRE, 8.0)] = NODE_HU
    array[22:27, 47:49, 48:] = NODE_HU  # a 1.6 mm strand from the node to the box's edge
    look = look_at(_volume(array), _place(CENTRE), 16.0, 16.0)
    assert look.outcome == MEASURED
    assert look.short_axis_mm == pytest.approx(16.0, abs=1.0)


def test_a_node_grown_well_past_its_old_size_is_measured_whole() -> None:
    array = np.full(SHAPE, FAT_HU)
    array[_ball(CENTRE, 14.0)] = NODE_HU  # was 16 mm, now 28 mm
    look = look_at(_volume(array), _place((25, 50, 47)), 16.0, 18.0)
    assert look.outcome == MEASURED
    assert look.short_axis_mm == pytest.approx(28.0, abs=1.2)


def test_the_scan_edge_is_no_continuation() -> None:
    """A node cut by the first slice does not continue past the scan: it is measured, and
    marked as measured in part."""
    array = np.full(SHAPE, FAT_HU)
    array[_ball((1, 48, 48), 8.0)] = NODE_HU
    look = look_at(_volume(array), _place((2, 48, 48)), 14.0, 16.0)
    assert look.outcome == MEASURED and look.at_scan_edge
    assert look.to_json()["at_scan_edge"] is True and look.note == rules.FLAG_SCAN_EDGE
    whole = np.full(SHAPE, FAT_HU)
    whole[_ball(CENTRE, 8.0)] = NODE_HU
    assert not look_at(_volume(whole), _place(CENTRE), 14.0, 16.0).at_scan_edge


def test_a_place_outside_the_scan_is_unclear() -> None:
    array = np.full(SHAPE, FAT_HU)
    look = look_at(_volume(array), _place((80, 48, 48)), 14.0, 16.0)
    assert look.outcome == UNCLEAR and "outside the scan" in look.note


def test_a_node_pressed_against_an_organ_of_its_density_is_cut_at_the_neck() -> None:
    """A grown node against the liver: the reader separates them by shape, so does the look."""
    array = np.full(SHAPE, FAT_HU)
    g = _grid_mm()
    c = _mm(CENTRE)
    array[g[2] > c[2] + 9.0] = 50.0  # an organ filling the box's side, 1 mm past the node's edge
    array[_ball(CENTRE, 10.0)] = NODE_HU  # reaches 1 mm into the organ: a broad contact
    look = look_at(_volume(array), _place(CENTRE), 16.0, 18.0)
    assert look.outcome == MEASURED
    assert look.short_axis_mm == pytest.approx(20.0, abs=2.0)
    assert look.volume_mm3 == pytest.approx(4 / 3 * math.pi * 10.0**3, rel=0.25)


def test_a_structure_more_than_twice_the_node_is_not_taken_for_it() -> None:
    """A 10 mm node's place now in a 26 mm structure: something else, not a size for it."""
    array = np.full(SHAPE, FAT_HU)
    array[_ball(CENTRE, 13.0)] = NODE_HU
    look = look_at(_volume(array), _place(CENTRE), 10.0, 12.0)
    assert look.outcome == UNCLEAR and "more than twice" in look.note
    assert look_at(_volume(array), _place(CENTRE), 14.0, 16.0).outcome == MEASURED  # 26 < 2 x 14
