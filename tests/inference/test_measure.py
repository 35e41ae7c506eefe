"""Measurements: ellipses and ellipsoids of known axes are measured within half a voxel."""

import math

import numpy as np
import pytest

from inference import rules
from inference.findings import SliceRef
from inference.measure import axial_diameters
from inference.nodes import Candidate, measure_node
from inference.volume import Volume


def ellipse(shape, spacing, centre, a, b, angle):
    j, i = np.mgrid[: shape[0], : shape[1]]
    y, x = (j - centre[0]) * spacing[0], (i - centre[1]) * spacing[1]
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


@pytest.mark.parametrize("angle", [0.0, 0.4, 1.1, math.pi / 2])
@pytest.mark.parametrize("spacing", [(0.7, 0.7), (0.6, 0.9)])
@pytest.mark.parametrize(("a", "b"), [(12.0, 5.0), (8.0, 7.5), (20.0, 9.0)])
def test_ellipse_axes_within_half_a_pixel(angle, spacing, a, b):
    mask = ellipse((120, 110), spacing, (60.3, 54.7), a, b, angle)
    d = axial_diameters(mask.astype(float), spacing)
    tol = max(spacing) / 2
    assert d.long_mm == pytest.approx(2 * a, abs=tol)
    assert d.short_mm == pytest.approx(2 * b, abs=tol)
    # the short axis is perpendicular to the long axis
    lv = np.subtract(*d.long_endpoints) * spacing
    sv = np.subtract(*d.short_endpoints) * spacing
    assert abs(np.dot(lv, sv)) / (np.linalg.norm(lv) * np.linalg.norm(sv)) < 0.02


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="no contour"):
        axial_diameters(np.zeros((10, 10)), (1.0, 1.0))


def oblique_volume(shape, spacing):
    rot = np.array([[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]])
    affine = np.eye(4)
    # columns: slice step, row step, column step (LPS)
    affine[:3, 0] = rot @ np.array([0, 0, spacing[0]])
    affine[:3, 1] = rot @ np.array([0, spacing[1], 0])
    affine[:3, 2] = rot @ np.array([spacing[2], 0, 0])
    affine[:3, 3] = (-100.0, -80.0, 40.0)
    refs = tuple(SliceRef(f"1.2.3.{k}", "1.2.840.10008.5.1.4.1.1.2") for k in range(shape[0]))
    return Volume(np.zeros(shape, np.float32), affine, refs, "1.2.3", "1.2.3.4", "1.2.3.5")


def test_ellipsoid_measured_in_patient_space():
    spacing = (1.25, 0.7, 0.8)
    shape = (40, 90, 80)
    vol = oblique_volume(shape, spacing)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    z, y, x = (k - 20.2) * spacing[0], (j - 45.1) * spacing[1], (i - 39.6) * spacing[2]
    a, b, c = 14.0, 6.0, 9.0
    u = x * math.cos(0.5) + y * math.sin(0.5)
    v = -x * math.sin(0.5) + y * math.cos(0.5)
    mask = (u / a) ** 2 + (v / b) ** 2 + (z / c) ** 2 <= 1.0
    vol.array[mask] = 45.0
    m = measure_node(vol, Candidate(mask=mask, bbox=(0, 0, 0, *shape), soft=mask.astype(float)))
    assert m["key_slice"] == 20
    assert m["long"].length_mm == pytest.approx(2 * a, abs=0.4)
    assert m["short"].length_mm == pytest.approx(2 * b, abs=0.4)
    assert m["volume_mm3"] == pytest.approx(4 / 3 * math.pi * a * b * c, rel=0.03)
    assert m["mean_hu"] == pytest.approx(45.0)
    centre = vol.to_lps(np.array([20.2, 45.1, 39.6]))
    assert np.allclose(m["centroid_lps"], centre, atol=0.5)
    # endpoints lie in the key slice plane and are as far apart as the length says
    p0, p1 = np.array(m["long"].endpoints_lps_mm)
    assert np.linalg.norm(p1 - p0) == pytest.approx(m["long"].length_mm, abs=1e-6)
    normal = vol.affine[:3, 0] / np.linalg.norm(vol.affine[:3, 0])
    key_origin = vol.to_lps(np.array([20.0, 0.0, 0.0]))
    assert abs(np.dot(p0 - key_origin, normal)) < 1e-6
    # pixel endpoints are (column, row) + 0.5 of the same points
    (c0, r0), _ = m["long"].endpoints_pixel
    assert np.allclose(vol.to_lps(np.array([20, r0 - 0.5, c0 - 0.5])), p0)


def test_a_node_reaching_the_edge_of_the_scan_is_flagged():
    spacing = (2.0, 0.8, 0.8)
    shape = (12, 40, 40)
    vol = oblique_volume(shape, spacing)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    for centre, cut in (((6.0, 20.0, 20.0), False), ((1.0, 20.0, 20.0), True), ((6.0, 20.0, 37.0), True)):
        mask = ((k - centre[0]) * 2.0 / 5) ** 2 + ((j - centre[1]) * 0.8 / 5) ** 2 + (
            (i - centre[2]) * 0.8 / 6
        ) ** 2 <= 1
        vol.array[:] = 0.0
        vol.array[mask] = 45.0
        m = measure_node(vol, Candidate(mask=mask, bbox=(0, 0, 0, *shape), soft=mask.astype(float)))
        assert (rules.FLAG_SCAN_EDGE in m["flags"]) is cut, centre
