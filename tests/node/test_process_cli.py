"""`nodal process` end to end on a phantom: finds its nodes, writes valid result objects."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from inference import phantoms

SPEC = phantoms.PhantomSpec(rows=288, columns=288, pixel_spacing_mm=1.25, slices=64, slice_spacing_mm=2.5)


def nodal(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *map(str, args)], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("process")
    ph = phantoms.generate(1_500_001, SPEC)
    phantoms.write_phantom(ph, root / "ct")
    res = nodal("process", root / "ct", "--out", root / "out")
    assert res.returncode == 0, res.stderr
    return ph, root, res


@pytest.mark.slow
def test_finds_the_nodes(processed):
    ph, root, res = processed
    doc = json.loads((root / "out" / "findings.json").read_text())
    assert {"study_instance_uid", "series_instance_uid", "model", "nodes"} <= set(doc)
    assert doc["slice_spacing_mm"] == 2.5 and doc["remarks"] == []  # at the model's limit: no remark
    found = np.array([n["centroid_lps_mm"] for n in doc["nodes"]]).reshape(-1, 3)
    for node in ph.nodes:
        if node.short_axis_mm < 8:
            continue
        dist = np.linalg.norm(found - np.array(node.centre_lps_mm), axis=1).min() if len(found) else np.inf
        assert dist < node.short_axis_mm / 2, f"node of {node.short_axis_mm:.1f} mm not found"
        best = min(
            doc["nodes"], key=lambda n: np.linalg.norm(np.subtract(n["centroid_lps_mm"], node.centre_lps_mm))
        )
        # accuracy is measured by `nodal evaluate` (benchmarks/RESULTS.md); here the node must
        # be measured as the node it is, not as a fragment or a merged neighbour
        assert abs(best["short_axis_mm"] - node.short_axis_mm) <= max(2.0, 0.4 * node.short_axis_mm)
        assert 0.0 <= best["malignancy_probability"] <= 1.0
    assert "LN-1" in res.stdout  # the findings table


@pytest.mark.slow
@pytest.mark.peers
def test_result_objects_pass_dciodvfy(processed):
    _, root, _ = processed
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (Debian dicom3tools) not installed; `make test` installs it")
    files = sorted((root / "out").glob("*.dcm"))
    assert {"seg.dcm", "sr.dcm"} <= {f.name for f in files}
    for f in files:
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (f.name, errors)


@pytest.mark.slow
def test_each_node_has_one_volume_in_findings_seg_and_sr(processed):
    """The findings are measured from the masks the SEG holds, and no voxel is in two."""
    import highdicom as hd

    _, root, _ = processed
    nodes = json.loads((root / "out" / "findings.json").read_text())["nodes"]
    seg = hd.seg.segread(root / "out" / "seg.dcm")
    sr = hd.sr.srread(root / "out" / "sr.dcm")
    assert seg.SegmentsOverlap == "NO"
    voxel_mm3 = SPEC.pixel_spacing_mm**2 * SPEC.slice_spacing_mm
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(nodes) == len(seg.segment_numbers) == len(groups) > 0
    labels = seg.get_volume(combine_segments=True, relabel=True).array
    for number, (node, group) in enumerate(zip(nodes, groups, strict=True), start=1):
        in_seg = int((labels == number).sum()) * voxel_mm3
        in_sr = next(m.value for m in group.get_measurements() if m.name.value == "118565006")
        assert node["volume_mm3"] == round(in_seg, 1)  # findings.json rounds to 0.1 mm³ (406.25 -> 406.2)
        assert in_sr == pytest.approx(in_seg, abs=0.05)


def test_missing_slice_is_refused_with_a_clear_message(tmp_path):
    ph = phantoms.generate(
        5,
        phantoms.PhantomSpec(
            rows=64, columns=64, pixel_spacing_mm=6.0, slices=12, slice_spacing_mm=5.0, nodes=(0, 0)
        ),
    )
    paths = phantoms.write_phantom(ph, tmp_path / "ct")
    paths[5].unlink()
    res = nodal("process", tmp_path / "ct", "--out", tmp_path / "out")
    assert res.returncode == 1
    assert "MissingSlicesError" in res.stderr and "gap" in res.stderr
    assert not (tmp_path / "out" / "findings.json").exists()
