"""nodal's own SR read back as the nodes of a prior study (`sr_templates.reader`)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from inference.followup import FROM_SR, FollowUpError
from sr_templates import is_nodal_sr, read_prior_nodes, read_prior_study, write_results
from tests.helpers.sr_case import make_case


@pytest.fixture(scope="module")
def written(case) -> dict[str, pydicom.Dataset]:
    paths = write_results(case.datasets, case.findings, case.folder / "out", result_images=False)
    return {p.name: pydicom.dcmread(p) for p in paths}


def test_recognises_nodal_sr_only(case, written) -> None:
    assert is_nodal_sr(written["sr.dcm"])
    assert not is_nodal_sr(written["seg.dcm"])
    assert not is_nodal_sr(case.datasets[0])
    other = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(written["sr.dcm"])))
    other.Manufacturer = "another vendor"
    assert not is_nodal_sr(other)
    with pytest.raises(FollowUpError, match="not an SR written by nodal"):
        read_prior_nodes(other, written["seg.dcm"])


def test_nodes_equal_the_findings_with_seg_centroids(case, written) -> None:
    nodes = read_prior_nodes(written["sr.dcm"], written["seg.dcm"])
    assert [n.label for n in nodes] == [f.label for f in case.findings.findings]
    for node, f in zip(nodes, case.findings.findings, strict=True):
        assert node.tracking_uid == f.tracking_uid
        assert node.short_axis_mm == pytest.approx(f.short_axis.length_mm, abs=1e-4)
        assert node.long_axis_mm == pytest.approx(f.long_axis.length_mm, abs=1e-4)
        assert node.volume_mm3 == pytest.approx(f.volume_mm3, abs=1e-3)
        assert node.malignancy_probability == pytest.approx(f.malignancy_probability, abs=1e-6)
        assert np.allclose(node.centroid_lps_mm, f.centroid_lps_mm, atol=0.01)


def test_without_seg_the_long_axis_midpoint_places_the_node(case, written) -> None:
    nodes = read_prior_nodes(written["sr.dcm"], images=case.datasets)
    for node, f in zip(nodes, case.findings.findings, strict=True):
        # the midpoint of the long axis on the key slice: within a voxel or two of the centroid
        assert np.linalg.norm(np.subtract(node.centroid_lps_mm, f.centroid_lps_mm)) < 3.0


def test_a_node_without_position_is_a_clear_error(written) -> None:
    with pytest.raises(FollowUpError, match="give the prior's SEG"):
        read_prior_nodes(written["sr.dcm"])


def test_prior_study_and_no_findings(case, written, tmp_path) -> None:
    study = read_prior_study(written["sr.dcm"], written["seg.dcm"])
    assert study.source == FROM_SR
    assert study.study_instance_uid == case.findings.study_instance_uid
    assert study.series_instance_uid == case.findings.series_instance_uid
    assert len(study.nodes) == len(case.findings.findings)
    empty = make_case(tmp_path, nodes=(), uid_seed="nodal-reader-empty")
    paths = write_results(empty.datasets, empty.findings, tmp_path / "out", result_images=False)
    assert read_prior_nodes(pydicom.dcmread(paths[0])) == ()


def _bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_segment_reaching_the_edge_of_the_prior_ct_marks_its_node(tmp_path) -> None:
    from inference.dicom_volume import load_series
    from tests.helpers.sr_case import NODES, NodeSpec

    at_first_slice = NodeSpec((0.6, 30.0, 40.0), (5.0, 5.0, 6.0), 0.5, "pathological non-target (10-15 mm)")
    at_last_row = NodeSpec((10.0, 58.4, 30.0), (4.0, 4.0, 5.0), 0.5, "normal (<10 mm)")
    edge = make_case(tmp_path, nodes=(NODES[0], at_first_slice, at_last_row), uid_seed="nodal-reader-edge")
    paths = write_results(edge.datasets, edge.findings, tmp_path / "out", result_images=False)
    written = {p.name: pydicom.dcmread(p) for p in paths}
    sr, seg = written["sr.dcm"], written["seg.dcm"]
    volume = load_series(edge.datasets)
    nodes = {n.tracking_uid: n for n in read_prior_nodes(sr, seg, images=edge.datasets, volume=volume)}
    marked = {f.label: nodes[f.tracking_uid].at_scan_edge for f in edge.findings.findings}
    assert marked == {"LN-1": False, "LN-2": True, "LN-3": True}
    # a CT elsewhere (not the SEG's series): no point of a segment lies in it, none is marked
    import dataclasses

    shifted = volume.affine.copy()
    shifted[:3, 3] += 500.0
    elsewhere = dataclasses.replace(volume, affine=shifted)
    assert not any(n.at_scan_edge for n in read_prior_nodes(sr, seg, images=edge.datasets, volume=elsewhere))
    # without the prior CT the edge is unknown: no node is marked
    assert not any(n.at_scan_edge for n in read_prior_nodes(sr, seg, images=edge.datasets))
    study = read_prior_study(sr, seg, images=edge.datasets, volume=volume)
    assert sum(n.at_scan_edge for n in study.nodes) == 2
