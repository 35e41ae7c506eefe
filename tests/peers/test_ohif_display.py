"""What the radiologist sees: nodal's SEG and SR in OHIF 3.13, in a real browser.

A phantom CT is analysed by `nodal process`; the CT and nodal's SEG, SR and result images
go into Orthanc; OHIF (its prebuilt `dist/`, `make ohif`) opens the study through Orthanc's
DICOMweb in Debian's headless chromium, driven over the DevTools protocol (Playwright). The
test double-clicks the SEG and then the SR as a radiologist would, and asserts on what
OHIF itself holds (its services and Cornerstone's state), not on pixels:

* every segment's voxel count in OHIF's labelmap equals the SEG file's;
* in the SR viewport every node is one measurement with two lines drawn (long and short
  axis) and its values: the call and size class, both axes, the volume, the probability;
* no uncaught error in the page;
* a node cut by the edge of the scan (the CT made to end inside it) has, in OHIF too, the
  comment that says it is measured in part;
* a study without nodes on slices 5 mm apart: OHIF holds the SR's group with the remark
  that small nodes may be missed.

Screenshots for a person go to var/ohif/ (the README's come from there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests

from inference import phantoms
from tests.helpers.ohif import (
    SR_STATE_JS,
    display_sets,
    frame,
    missing,
    ohif_page,
    open_sr,
    settled,
)
from tests.helpers.peers import Orthanc

pytestmark = [pytest.mark.slow, pytest.mark.peers]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "var" / "ohif"
SPEC = phantoms.PhantomSpec(rows=288, columns=288, pixel_spacing_mm=1.25, slices=64, slice_spacing_mm=2.5)
SEED = 1_500_001

#: Voxels per segment in OHIF's labelmap(s), through the segment bindings Cornerstone keeps
#: (one labelmap layer per group of non-overlapping segments).
SEGMENT_VOXELS_JS = """() => {
  const seg = window.services.segmentationService.getSegmentations()[0];
  const lm = seg.representationData.Labelmap;
  const layers = lm.labelmaps || {};
  const counts = {};
  for (const [layerId, layer] of Object.entries(layers)) {
    counts[layerId] = {};
    for (const id of layer.imageIds || lm.imageIds) {
      const image = window.cornerstone.cache.getImage(id);
      const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      for (let i = 0; i < data.length; i++) {
        if (data[i]) counts[layerId][data[i]] = (counts[layerId][data[i]] || 0) + 1;
      }
    }
  }
  const out = {};
  for (const [index, segment] of Object.entries(seg.segments)) {
    if (!segment) continue;
    const b = (lm.segmentBindings || {})[index]
      || {labelmapId: lm.primaryLabelmapId, labelValue: Number(index)};
    out[index] = {label: segment.label, voxels: (counts[b.labelmapId] || {})[b.labelValue] || 0};
  }
  return out;
}"""

#: OHIF's tracked measurements: tool, label and the texts it shows.
TRACKED_JS = """() => window.services.measurementService.getMeasurements()
  .map(m => ({tool: m.toolName, label: m.label, primary: (m.displayText || {}).primary || []}))"""


def _process(ct: Path, out: Path, **env: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "process", str(ct), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """A phantom CT and nodal's results for it, as `nodal process` writes them."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ohif")
    phantoms.write_phantom(phantoms.generate(SEED, SPEC), root / "ct")
    _process(root / "ct", root / "out")
    return root


@contextmanager
def _viewer(files: list[Path], folder: Path, seen: dict) -> Iterator:
    """A page of OHIF showing the study of `files`, stored in an Orthanc of its own."""
    orthanc = Orthanc(folder).start()
    try:
        for f in files:
            requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        with ohif_page(orthanc.url, study, len({_series(f) for f in files}), seen) as page:
            yield page
    finally:
        orthanc.stop()


def _series(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


@pytest.fixture(scope="module")
def viewed(processed: Path, tmp_path_factory) -> dict:
    """Open the study in OHIF, load the SEG, then the SR; what OHIF held at each step."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    files = sorted((processed / "ct").glob("*.dcm")) + sorted((processed / "out").glob("*.dcm"))
    nodes = _findings(processed)
    seen: dict = {"page_errors": [], "console_errors": []}
    with _viewer(files, tmp_path_factory.mktemp("orthanc-ohif"), seen) as page:
        uid = display_sets(page)
        seen["modalities"] = sorted(uid)

        page.dblclick(f"#thumbnail-{uid['SEG']}")
        page.get_by_role("button", name="Yes").click()  # "open this Segmentation?"
        page.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0")
        seen["segments"] = settled(page, SEGMENT_VOXELS_JS)
        page.evaluate(
            "() => { const s = window.services.segmentationService.getSegmentations()[0];"
            " window.services.segmentationService.jumpToSegmentCenter(s.segmentationId, 1); }"
        )
        frame(page, nodes[0]["centroid_lps_mm"])
        page.screenshot(path=str(SCREENSHOTS / "seg.png"))

        seen["sr"], seen["svg"] = open_sr(page, uid["SR"])
        shown = [n for n in nodes if n["tracking_uid"] in seen["svg"]["texts"]]
        frame(page, shown[0]["centroid_lps_mm"] if shown else nodes[0]["centroid_lps_mm"], 2.5)
        page.screenshot(path=str(SCREENSHOTS / "sr.png"))
    return seen


@pytest.fixture(scope="module")
def tracked(processed: Path, tmp_path_factory) -> dict:
    """The SR written with `results.editable_in_ohif`, opened in OHIF and taken over as
    tracked measurements ("continue tracking measurements for this study?" Yes)."""
    out = processed / "out-editable"
    _process(processed / "ct", out, NODAL_RESULTS__EDITABLE_IN_OHIF="true")
    files = [*sorted((processed / "ct").glob("*.dcm")), out / "sr.dcm"]
    seen: dict = {"page_errors": [], "console_errors": []}
    with _viewer(files, tmp_path_factory.mktemp("orthanc-ohif-tracked"), seen) as page:
        page.dblclick(f"#thumbnail-{display_sets(page)['SR']}")
        page.get_by_role("button", name="Yes").click()
        # OHIF fills a measurement's display text once it has computed the lengths, one
        # measurement after another: on a loaded machine two equal readings a second apart
        # can still hold one without them, so wait until every measurement has its lengths
        page.wait_for_function(
            f"() => {{ const ms = ({TRACKED_JS})();"
            " return ms.length > 0 && ms.every(m => m.primary.length >= 2); }",
            timeout=120_000,
        )
        seen["measurements"] = settled(page, TRACKED_JS)
        page.screenshot(path=str(SCREENSHOTS / "sr-tracked.png"))
    return seen


@pytest.fixture(scope="module")
def cut_node(tmp_path_factory) -> dict:
    """The same phantom scanned to just short of the far end of its largest node: nodal flags
    that node as cut by the edge of the scan (it is LN-1, the SR's first measurement, so
    OHIF opens the SR on it). Its findings and what OHIF shows of its SR."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ohif-cut")
    phantom = phantoms.generate(SEED, SPEC)
    node = max(phantom.nodes, key=lambda n: n.short_axis_mm)
    stop = int(np.argwhere(phantom.labels == node.index)[:, 0].max())  # its last slice left out
    phantoms.write_phantom(
        dataclasses.replace(
            phantom, hu=phantom.hu[:stop], labels=phantom.labels[:stop], tissue=phantom.tissue[:stop]
        ),
        root / "ct",
        uid_seed=f"nodal-phantom-{SEED}-cut",  # UIDs of its own, not the whole CT's
    )
    _process(root / "ct", root / "out")
    seen: dict = {"page_errors": [], "console_errors": [], "findings": _findings(root)}
    files = [*sorted((root / "ct").glob("*.dcm")), root / "out" / "sr.dcm"]
    with _viewer(files, tmp_path_factory.mktemp("orthanc-ohif-cut"), seen) as page:
        seen["sr"], seen["svg"] = open_sr(page, display_sets(page)["SR"])
        x, y, z = seen["findings"][0]["centroid_lps_mm"]
        # centred 50 mm to the patient's left of the node, which so stands left of the
        # screen's centre and leaves room on the right for its long comment
        frame(page, [x + 50.0, y, z], 2.5)
        page.screenshot(path=str(SCREENSHOTS / "sr-cut.png"))
    return seen


@pytest.fixture(scope="module")
def no_nodes(tmp_path_factory) -> dict:
    """A phantom without nodes, scanned with slices 5 mm apart (the demo model's card says
    it finds small nodes on slices up to 2.5 mm apart): nodal's findings.json, and what OHIF
    holds of the SR once the radiologist opens it."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ohif-none")
    spec = dataclasses.replace(SPEC, slices=20, slice_spacing_mm=5.0, nodes=(0, 0))
    phantoms.write_phantom(phantoms.generate(1_500_003, spec), root / "ct")
    _process(root / "ct", root / "out")
    seen: dict = {"page_errors": [], "console_errors": []}
    seen["doc"] = json.loads((root / "out" / "findings.json").read_text())
    files = [*sorted((root / "ct").glob("*.dcm")), *sorted((root / "out").glob("*.dcm"))]
    with _viewer(files, tmp_path_factory.mktemp("orthanc-ohif-none"), seen) as page:
        uid = display_sets(page)["SR"]
        page.dblclick(f"#thumbnail-{uid}")
        page.wait_for_function(
            "(uid) => (window.services.displaySetService.getDisplaySetByUID(uid).measurements || [])"
            ".length > 0",
            arg=uid,
        )
        seen["sr"] = settled(page, SR_STATE_JS, uid)
    return seen


def _findings(processed: Path) -> list[dict]:
    return json.loads((processed / "out" / "findings.json").read_text())["nodes"]


def _seg_voxels(path: Path) -> dict[int, int]:
    seg = hd.seg.segread(path)
    return {
        n: int((seg.get_volume(segment_numbers=[n], combine_segments=False).array > 0).sum())
        for n in seg.segment_numbers
    }


def test_the_study_opens_with_ct_seg_sr_and_result_images(viewed) -> None:
    assert viewed["modalities"] == ["CT", "OT", "SEG", "SR"]


def test_every_segment_keeps_all_its_voxels_in_ohif(processed, viewed) -> None:
    findings = _findings(processed)
    expected = _seg_voxels(processed / "out" / "seg.dcm")
    assert len(expected) == len(findings) > 0
    shown = {int(k): v for k, v in viewed["segments"].items()}
    assert {n: s["voxels"] for n, s in shown.items()} == expected
    assert [shown[n]["label"] for n in sorted(shown)] == [f["label"] for f in findings]


def test_every_node_has_two_lines_and_its_values_in_the_sr_viewport(processed, viewed) -> None:
    findings = _findings(processed)
    measurements = {m["uid"]: m for m in viewed["sr"]["measurements"]}
    drawn = {a["uid"]: a for a in viewed["sr"]["annotations"]}
    assert set(measurements) == set(drawn) == {f["tracking_uid"] for f in findings}
    for f in findings:
        m = measurements[f["tracking_uid"]]
        assert m["loaded"], f"{f['label']} was not placed on its image"
        assert len(m["lines"]) == 2 and drawn[f["tracking_uid"]]["lines"] == 2, f["label"]
        lengths = sorted(np.hypot(x1 - x0, y1 - y0) for x0, y0, x1, y1 in m["lines"])
        assert lengths[0] > 0
        labels = {entry["label"]: entry["value"] for entry in m["labels"]}
        call = "malignant" if f["malignancy_probability"] >= 0.5 else "benign"
        assert f"{f['label']} {call}, size: {f['size_category']}" in labels
        # OHIF prints two decimals; findings.json rounds axes to 0.01, volume to 0.1 and
        # the probability to 0.0001
        for label, unit, expected, rounding in (
            ("Long Axis", "mm", f["long_axis_mm"], 0.01),
            ("Short Axis", "mm", f["short_axis_mm"], 0.01),
            ("Volume", "mm3", f["volume_mm3"], 0.1),
            ("Probability of cancer", "%", 100 * f["malignancy_probability"], 0.01),
        ):
            number, shown_unit = labels[label].split()
            assert shown_unit == unit and abs(float(number) - expected) <= rounding, (f["label"], label)
        assert drawn[f["tracking_uid"]]["labels"] == m["labels"]


def test_the_nodes_on_the_slice_shown_are_drawn_with_both_lines_and_their_text(processed, viewed) -> None:
    findings = {f["tracking_uid"]: f for f in _findings(processed)}
    shown = viewed["svg"]["texts"]
    assert shown, "no SR annotation drawn on the slice shown"
    assert viewed["svg"]["lines"] == 2 * len(shown)
    for uid, lines in shown.items():
        f = findings[uid]
        assert lines[0].startswith(f"{f['label']} ")
        assert lines[1].startswith("L: ") and lines[1].endswith(" mm")  # OHIF's short hand
        assert lines[2].startswith("W: ") and lines[2].endswith(" mm")
        assert abs(float(lines[1].split()[-2]) - f["long_axis_mm"]) <= 0.01
        assert abs(float(lines[2].split()[-2]) - f["short_axis_mm"]) <= 0.01


def test_no_uncaught_error_in_the_page(viewed) -> None:
    assert viewed["page_errors"] == []
    assert [e for e in viewed["console_errors"] if "Uncaught" in e] == []


def test_editable_sr_becomes_one_tracked_bidirectional_measurement_per_node(processed, tracked) -> None:
    """`results.editable_in_ohif`: OHIF takes the axes over as measurements the radiologist
    can keep, correct or delete, each named with its node's call and size class."""
    findings = _findings(processed)
    measurements = tracked["measurements"]
    assert [m["tool"] for m in measurements] == ["Bidirectional"] * len(findings)
    by_label = {m["label"].split(" ")[0]: m for m in measurements}
    for f in findings:
        m = by_label[f["label"]]
        call = "malignant" if f["malignancy_probability"] >= 0.5 else "benign"
        assert m["label"] == f"{f['label']} {call}, size: {f['size_category']}"
        long_text, short_text = m["primary"][:2]
        assert long_text.startswith("L: ") and short_text.startswith("W: ")
        # OHIF recomputes the lengths from the line end points: the SR's lines are the axes
        assert abs(float(long_text.split()[1]) - f["long_axis_mm"]) <= 0.06
        assert abs(float(short_text.split()[1]) - f["short_axis_mm"]) <= 0.06
    assert tracked["page_errors"] == []


def test_a_node_cut_by_the_edge_of_the_scan_says_so_in_ohif(cut_node) -> None:
    """Beside a cut node's lines the radiologist reads that its sizes are those of the part
    in the scan: the SR's comment, as OHIF holds it and draws it on the slice shown."""
    remark = "; cut by the edge of the scan, measured in part"
    edge = "cut by the edge of the scan"
    flagged = {f["tracking_uid"]: f for f in cut_node["findings"] if edge in f["flags"]}
    assert flagged and cut_node["findings"][0]["tracking_uid"] in flagged
    measurements = {m["uid"]: m for m in cut_node["sr"]["measurements"]}
    for uid, f in flagged.items():
        labels = [e["label"] for e in measurements[uid]["labels"]]
        comments = [label for label in labels if label.startswith(f"{f['label']} ")]
        assert len(comments) == 1 and comments[0].endswith(remark), comments
    shown = cut_node["svg"]["texts"]
    assert any(remark in lines[0] for uid, lines in shown.items() if uid in flagged), shown
    others = [lines[0] for uid, lines in shown.items() if uid not in flagged]
    assert not any(remark in line for line in others)
    assert cut_node["page_errors"] == []


def test_no_nodes_on_thick_slices_says_small_nodes_may_be_missed_in_ohif(no_nodes) -> None:
    """ "No lymph nodes found" on slices 5 mm apart: OHIF holds the SR's one group with the
    remark as its label. It draws nothing for it (the group has no coordinates: the SR
    viewport stays empty), so the key images carry the same line (docs/results.md)."""
    remark = "thick slices (5.0 mm apart, over 2.5): small nodes may be missed"
    assert no_nodes["doc"]["nodes"] == [] and no_nodes["doc"]["remarks"] == [remark]
    (measurement,) = no_nodes["sr"]["measurements"]
    assert [e["label"] for e in measurement["labels"]] == [remark]
    assert measurement["lines"] == [] and no_nodes["sr"]["annotations"] == []
    assert no_nodes["page_errors"] == []
