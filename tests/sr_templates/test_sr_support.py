"""Shared helpers for the result-object tests (SEG, SR, result images), plus their own tests.

`make_case` writes a small synthetic CT series with `inference.ct_series` (single-frame,
Enhanced CT, compressed, non-ASCII patient...), reads it back, loads it with
`inference.dicom_volume.load_series` and builds the findings by hand
(`sr_templates.synthetic`): ellipsoid "nodes" of known size painted into the volume.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sr_templates.synthetic import ellipsoid_finding
from tests.helpers.sr_case import NODES, SHAPE, SPACING, affine, make_case

#: Two nodes: an oval malignant-looking one and a small round benign one.

#: Voxel values: background fat, nodes soft tissue.


# --- the helpers' own tests ---------------------------------------------------------------


def test_ellipsoid_finding_has_the_geometry_it_was_made_with() -> None:
    spec = NODES[0]
    finding = ellipsoid_finding(
        label="LN-1",
        tracking_uid="1.2.3",
        shape=SHAPE,
        affine=affine(),
        center_kji=spec.center_kji,
        radii_mm=spec.radii_mm,
    )
    assert finding.key_slice == 10  # the centre slice has the largest cross-section
    assert finding.long_axis.length_mm == pytest.approx(2 * 8.0)
    assert finding.short_axis.length_mm == pytest.approx(2 * 5.0)
    expected_volume = 4 / 3 * math.pi * 6.0 * 5.0 * 8.0
    assert finding.volume_mm3 == pytest.approx(expected_volume, rel=0.15)
    assert np.allclose(finding.centroid_voxel, spec.center_kji, atol=0.05)
    (c0, r0), (c1, r1) = finding.long_axis.endpoints_pixel
    assert (r0, r1) == (30.5, 30.5)  # along a row, through the centre pixel
    assert abs(c1 - c0) * SPACING[2] == pytest.approx(16.0)
    lps = np.array(finding.long_axis.endpoints_lps_mm)
    assert np.linalg.norm(lps[1] - lps[0]) == pytest.approx(16.0)


def test_make_case_reads_back_the_series(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    assert len(case.datasets) == SHAPE[0]
    assert case.findings.shape == SHAPE
    assert [f.label for f in case.findings.findings] == ["LN-1", "LN-2"]
