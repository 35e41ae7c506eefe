"""What the radiologist sees of a follow-up: nodal's follow-up SR in OHIF 3.13 (issue 17).

A phantom pair (`inference.phantom_pairs`: the same patient scanned again, re-positioned,
nodes grown, shrunk, resolved or new) is written as two CT studies of one patient and
stored in a real Orthanc. The follow-up is analysed as a worker does it
(`analyse_and_write` with the node's follow-up hook `jobs.followup.prior_comparison`): the
prior is found in Orthanc over QIDO-RS, fetched over WADO-RS, analysed with the shipped
model and compared; the current SEG, SR and result images and the prior's own results go
into Orthanc as delivery sends them. OHIF opens the follow-up study in headless chromium;
the follow-up SR is double-clicked, its measurements stepped through with the viewport's
arrows, and the prior study opened from the study list, as a radiologist would. Asserted on
what OHIF holds (its display sets, Cornerstone's annotations, the SVG it drew):

* every current node is one measurement placed on its image with its two lines, its call
  and size class with the change since the prior in words (or "new since"), its current
  values, and for a matched node its prior values (the prior time point after them);
* the text on the image: the node's line with the change, both axes, time point, volume;
* every gone node is a measurement OHIF places in the prior's frame of reference once the
  prior study is opened, and draws nowhere; the study's response is no measurement;
* stepping through the measurements shows every current node; no uncaught error;
* written with `results.editable_in_ohif`, each current node becomes one tracked
  Bidirectional measurement.

docs/follow-up.md ("In OHIF") says what this means for the radiologist. Screenshots:
var/ohif/followup-sr.png, followup-sr-new.png, followup-sr-matched.png, followup-prior-ct.png,
followup-sr-tracked.png.
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.config import Settings
from inference import phantoms
from inference.ct_series import PatientInfo
from inference.phantom_pairs import make_pair
from tests.helpers.followup import restamp, upload
from tests.helpers.ohif import SVG_DRAWN_JS, display_sets, frame, missing, ohif_page, open_sr, settled
from tests.helpers.peers import Orthanc, free_port, model_dir, node_config

pytestmark = [pytest.mark.slow, pytest.mark.peers]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "var" / "ohif"
SPEC = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)
# a "mixed" pair in which the demo model finds nodes matched, new and gone
SEED, SCENARIO = 4_170_002, "mixed"
PATIENT, PRIOR_DATE, CURRENT_DATE = "FU-OHIF", "20260301", "20260601"
PRIOR_SHOWN = "01-Mar-2026"  # how OHIF's study list names the prior study

#: Display sets OHIF holds now.
DISPLAY_SETS_JS = """() => window.services.displaySetService.getActiveDisplaySets()
  .map(d => ({uid: d.displaySetInstanceUID, modality: d.Modality, study: d.StudyInstanceUID}))"""

#: Where OHIF placed each of the SR's measurements (display set, coordinate types).
PLACED_JS = """(uid) => window.services.displaySetService.getDisplaySetByUID(uid).measurements
  .map(m => ({uid: m.TrackingUniqueIdentifier, loaded: m.loaded, on: m.displaySetInstanceUID || null,
              coords: m.coords.map(c => c.ValueType + ' ' + c.GraphicType)}))"""

#: The slice index of the active viewport.
SLICE_JS = """() => {
  const id = window.services.viewportGridService.getActiveViewportId();
  return window.services.cornerstoneViewportService.getCornerstoneViewport(id).getCurrentImageIdIndex();
}"""

#: Show the slice of the active (stack) viewport nearest to the LPS point `p` (axial).
TO_SLICE_JS = """(p) => {
  const id = window.services.viewportGridService.getActiveViewportId();
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
  const ids = vp.getImageIds();
  const z = ids.map(i => window.cornerstone.metaData.get('imagePlaneModule', i).imagePositionPatient[2]);
  const k = z.reduce((best, v, i) => Math.abs(v - p[2]) < Math.abs(z[best] - p[2]) ? i : best, 0);
  vp.setImageIdIndex(k);
  return Math.abs(z[k] - p[2]);
}"""

#: Whether the active viewport shows display set `ct` with its images (of study `study`).
SHOWS_JS = """([ct, study]) => {
  const grid = window.services.viewportGridService;
  const id = grid.getActiveViewportId();
  const shown = grid.getState().viewports.get(id);
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(id);
  const ids = vp && vp.getImageIds ? vp.getImageIds() : [];
  return !!shown && shown.displaySetInstanceUIDs.includes(ct) && ids.length > 0 && ids[0].includes(study);
}"""

#: OHIF's tracked measurements: tool, label and the texts it shows.
TRACKED_JS = """() => window.services.measurementService.getMeasurements()
  .map(m => ({tool: m.toolName, label: m.label, primary: (m.displayText || {}).primary || []}))"""

NEXT_MEASUREMENT = '[data-cy="viewport-action-arrows-right"] svg'


def _study(phantom, folder: Path, name: str, date: str) -> list[Path]:
    paths = phantoms.write_phantom(
        phantom, folder / name, patient=PatientInfo(id=PATIENT), uid_seed=f"nodal-ohif-fu-{name}"
    )
    restamp(paths, StudyDate=date, SeriesDate=date)
    return paths


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    o = Orthanc(tmp_path_factory.mktemp("orthanc-ohif-fu")).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def followed(orthanc: Orthanc, tmp_path_factory) -> dict:
    """Both studies in Orthanc, the follow-up analysed and compared as a worker does it, and
    its results (and the prior's) stored there; findings.json and the SR's gone-node places."""
    from dicom_node.jobs.analysis import analyse_and_write, load_model, load_volume, write_findings
    from dicom_node.jobs.followup import prior_comparison

    model = model_dir()
    if model is None:
        pytest.skip("no model (inference/models/demo, NODAL_TEST_MODEL_DIR)")
    root = tmp_path_factory.mktemp("ohif-fu")
    pair = make_pair(SEED, SCENARIO, SPEC)
    prior = _study(pair.prior, root, "prior", PRIOR_DATE)
    current = _study(pair.current, root, "current", CURRENT_DATE)
    upload(orthanc, prior + current)
    pacs = {"name": "pacs", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web", "query": {}}
    settings = Settings.model_validate(node_config(root / "var", free_port(), model, destinations=[pacs]))
    loaded = load_model(settings)
    out = root / "out"
    hook = partial(prior_comparison, settings, None, 1, loaded, current)
    written = analyse_and_write(
        load_volume(current, settings), current, out, settings, loaded, follow_up=hook
    )
    assert written.followup is not None and written.followup.outcome == "compared", written.followup
    assert written.followup.prior_source == "analysed" and written.followup.prior_files
    upload(orthanc, written.files)  # the current SEG, SR, result images and prior/ (the prior's own)
    # the same follow-up written as with `results.editable_in_ohif` (into its own Orthanc: `tracked`)
    editable = Settings.model_validate(
        node_config(root / "var", free_port(), model, results={"editable_in_ohif": True})
    )
    editable_files = write_findings(
        current, written.analysis.findings, root / "out-editable", editable, written.followup
    )
    doc = json.loads((out / "findings.json").read_text())
    statuses = {n["status"] for n in doc["comparison"]["nodes"]}
    assert statuses == {"matched", "new", "gone"}, doc["comparison"]["nodes"]  # the pair shows all three
    return {
        "doc": doc,
        "current_study": str(pydicom.dcmread(current[0], stop_before_pixels=True).StudyInstanceUID),
        "prior_study": str(pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID),
        "places": _gone_places(pydicom.dcmread(out / "sr.dcm")),
        "current": current,
        "editable_sr": next(p for p in editable_files if p.name == "sr.dcm"),
    }


def _gone_places(sr: pydicom.Dataset) -> dict[str, list[float]]:
    """Tracking UID -> the SCOORD3D point of each gone node's prior group in the SR."""
    out = {}
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in measurements.ContentSequence:
        uid = next(
            str(i.UID) for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040"
        )
        for item in group.ContentSequence:
            if item.ValueType == "SCOORD3D":
                out[uid] = [float(v) for v in item.GraphicData]
    return out


def _series_count(orthanc: Orthanc, study_uid: str) -> int:
    found = requests.post(f"{orthanc.url}/tools/lookup", data=study_uid, timeout=10).json()
    study = next(x["ID"] for x in found if x["Type"] == "Study")
    return len(requests.get(f"{orthanc.url}/studies/{study}/series", timeout=10).json())


@pytest.fixture(scope="module")
def viewed(orthanc: Orthanc, followed: dict) -> dict:
    """Open the follow-up study, double-click the SR, step through its measurements, open
    the prior study and its CT at a gone node: what OHIF held at each step."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("followup-*.png"):
        old.unlink()
    nodes = {n["tracking_uid"]: n for n in followed["doc"]["nodes"]}
    seen: dict = {"page_errors": [], "console_errors": []}
    study = followed["current_study"]
    with ohif_page(orthanc.url, study, _series_count(orthanc, study), seen) as page:
        uid = display_sets(page)
        seen["modalities"] = sorted(uid)
        seen["study_list"] = page.locator("body").inner_text()

        seen["sr"], seen["svg"] = open_sr(page, uid["SR"])
        first = nodes[next(iter(seen["svg"]["texts"]))]
        _frame_left(page, first["centroid_lps_mm"])
        page.screenshot(path=str(SCREENSHOTS / "followup-sr.png"))

        # the viewport's arrows: one step per measurement of the SR, round to the first again
        seen["steps"] = []
        seen["slice_before_steps"] = page.evaluate(SLICE_JS)
        compared = followed["doc"]["comparison"]["nodes"]
        new = {n["current_tracking_uid"] for n in compared if n["status"] == "new"}
        matched = {n["prior_tracking_uid"] for n in compared if n["status"] == "matched"}
        order = [m["uid"] for m in seen["sr"]["measurements"]]
        for n in range(len(order)):
            page.locator(NEXT_MEASUREMENT).first.click()
            target = order[(n + 1) % len(order)]
            if target in nodes:  # a current node: wait until it is drawn
                page.wait_for_function(f"(u) => ({SVG_DRAWN_JS})().texts[u] !== undefined", arg=target)
            else:  # a gone node: nothing to wait for, nothing should change
                time.sleep(2)
            svg = settled(page, SVG_DRAWN_JS)
            seen["steps"].append(
                {"slice": page.evaluate(SLICE_JS), "texts": svg["texts"], "lines": svg["lines"]}
            )
            shown_new = new & set(svg["texts"])
            if shown_new and "new_shown" not in seen:
                seen["new_shown"] = True
                _frame_left(page, nodes[shown_new.pop()]["centroid_lps_mm"])
                page.screenshot(path=str(SCREENSHOTS / "followup-sr-new.png"))
            shown_matched = matched & set(svg["texts"])
            if shown_matched and "matched_shown" not in seen:
                seen["matched_shown"] = True
                _frame_left(page, nodes[shown_matched.pop()]["centroid_lps_mm"])
                page.screenshot(path=str(SCREENSHOTS / "followup-sr-matched.png"))

        # the prior study, opened from the study list, and its CT at a gone node
        page.get_by_text(PRIOR_SHOWN).first.click()
        prior = followed["prior_study"]
        page.wait_for_function(f"() => ({DISPLAY_SETS_JS})().filter(d => d.study === '{prior}').length >= 4")
        seen["prior_sets"] = {d["uid"]: d for d in page.evaluate(DISPLAY_SETS_JS) if d["study"] == prior}
        everything = len(followed["places"]) + len(nodes)
        page.wait_for_function(
            f"(uid) => ({PLACED_JS})(uid).filter(m => m.loaded).length === {everything}", arg=uid["SR"]
        )
        seen["placed"] = page.evaluate(PLACED_JS, uid["SR"])
        prior_ct = next(u for u, d in seen["prior_sets"].items() if d["modality"] == "CT")
        page.dblclick(f"#thumbnail-{prior_ct}")
        page.wait_for_function(SHOWS_JS, arg=[prior_ct, prior])
        largest = max(_comparison(followed, "gone"), key=lambda n: n["short_axis_mm"]["prior"])
        gone_uid = largest["prior_tracking_uid"]
        point = followed["places"][gone_uid]
        seen["gone_shown"] = gone_uid
        time.sleep(3)  # the prior CT's images arrive
        seen["prior_slice_offset_mm"] = page.evaluate(TO_SLICE_JS, point)
        frame(page, point, 2.0)
        seen["svg_prior"] = settled(page, SVG_DRAWN_JS, rounds=5)
        page.screenshot(path=str(SCREENSHOTS / "followup-prior-ct.png"))
    return seen


@pytest.fixture(scope="module")
def tracked(followed: dict, tmp_path_factory) -> dict:
    """The SR written with `results.editable_in_ohif`, opened in OHIF (with the current CT
    alone) and taken over as tracked measurements ("continue tracking ...?" Yes)."""
    seen: dict = {"page_errors": [], "console_errors": []}
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc-ohif-fu-tracked")).start()
    try:
        upload(orthanc, [*followed["current"], followed["editable_sr"]])
        with ohif_page(orthanc.url, followed["current_study"], 2, seen) as page:
            page.dblclick(f"#thumbnail-{display_sets(page)['SR']}")
            page.get_by_role("button", name="Yes").click()
            page.wait_for_function("() => window.services.measurementService.getMeasurements().length > 0")
            seen["measurements"] = settled(page, TRACKED_JS)
            page.screenshot(path=str(SCREENSHOTS / "followup-sr-tracked.png"))
    finally:
        orthanc.stop()
    return seen


def _frame_left(page, centre_lps: list[float]) -> None:
    """Zoom on a node, placed left of the middle: its text box (one long first line) fits."""
    frame(page, [centre_lps[0] + 60.0, centre_lps[1], centre_lps[2]], 3.0)


def _labels(measurement: dict) -> list[tuple[str, str]]:
    return [(entry["label"], entry["value"]) for entry in measurement["labels"]]


def _number(value: str, unit: str) -> float:
    number, shown_unit = value.split()
    assert shown_unit == unit, value
    return float(number)


def _comparison(followed: dict, status: str) -> list[dict]:
    return [n for n in followed["doc"]["comparison"]["nodes"] if n["status"] == status]


def test_the_follow_up_opens_with_its_results_and_the_prior_in_the_study_list(viewed) -> None:
    assert viewed["modalities"] == ["CT", "OT", "SEG", "SR"]
    assert PRIOR_SHOWN in viewed["study_list"]
    assert sorted(d["modality"] for d in viewed["prior_sets"].values()) == ["CT", "OT", "SEG", "SR"]


def test_every_current_node_has_two_lines_its_change_and_its_values(followed, viewed) -> None:
    measurements = {m["uid"]: m for m in viewed["sr"]["measurements"]}
    drawn = {a["uid"]: a for a in viewed["sr"]["annotations"]}
    current = {n["tracking_uid"]: n for n in followed["doc"]["nodes"]}
    changes = {n["current_label"]: n for n in followed["doc"]["comparison"]["nodes"] if n["current_label"]}
    assert set(drawn) == set(current)
    for uid, f in current.items():
        m, change = measurements[uid], changes[f["label"]]
        assert m["loaded"] and len(m["lines"]) == 2 and drawn[uid]["lines"] == 2, f["label"]
        labels = _labels(m)
        call = "malignant" if f["malignancy_probability"] >= 0.5 else "benign"
        text, empty = labels[0]
        assert empty == "" and text.startswith(f"{f['label']} {call}, size: {f['size_category']}; ")
        names = [name for name, _ in labels[1:]]
        # the axes (their time point has no order), then the volume group's values
        current_part = ["Long Axis", "Short Axis", "Volume", "Probability of cancer", "Time Point Order"]
        if change["status"] == "new":
            assert text.endswith(f"; new since {PRIOR_DATE}")
            assert names == [*current_part, "Time Point Order"]  # absent at the prior time point
        else:
            sa = change["short_axis_mm"]
            found = re.search(
                rf"; SA ([\d.]+) -> ([\d.]+) mm \(([+-][\d.]+) mm, ([+-]\d+) %\) since {PRIOR_DATE}$", text
            )
            assert found, text
            assert abs(float(found[1]) - sa["prior"]) <= 0.06 and abs(float(found[2]) - sa["current"]) <= 0.06
            assert (
                abs(float(found[3]) - sa["change_mm"]) <= 0.11
                and abs(int(found[4]) - sa["change_percent"]) <= 1
            )
            assert names == [*current_part, "Short Axis", "Long Axis", "Volume", "Time Point Order"]
            prior = dict(labels[6:9])  # then "Time Point Order" 1
            assert abs(_number(prior["Short Axis"], "mm") - sa["prior"]) <= 0.01
            assert abs(_number(prior["Long Axis"], "mm") - change["long_axis_mm"]["prior"]) <= 0.01
            assert abs(_number(prior["Volume"], "mm3") - change["volume_mm3"]["prior"]) <= 0.1
        orders = [value for name, value in labels if name == "Time Point Order"]
        assert orders == ["2.00 1", "1.00 1"]  # current (the volume group's), prior
        now = dict(labels[1:5])  # the current values
        assert abs(_number(now["Long Axis"], "mm") - f["long_axis_mm"]) <= 0.01
        assert abs(_number(now["Short Axis"], "mm") - f["short_axis_mm"]) <= 0.01
        assert abs(_number(now["Volume"], "mm3") - f["volume_mm3"]) <= 0.1
        assert abs(_number(now["Probability of cancer"], "%") - 100 * f["malignancy_probability"]) <= 0.01


def test_the_text_on_the_image_is_the_change_both_axes_the_volume_and_the_probability(
    followed, viewed
) -> None:
    """OHIF writes a node's first five labels beside its lines: the node's line (with its
    change), both axes, the volume and the probability of cancer (the axes' time point has no
    order, which would take the probability's place)."""
    current = {n["tracking_uid"]: n for n in followed["doc"]["nodes"]}
    shown = viewed["svg"]["texts"]
    assert shown and viewed["svg"]["lines"] == 2 * len(shown)
    for uid, lines in shown.items():
        f = current[uid]
        assert len(lines) == 5, lines
        assert lines[0].startswith(f"{f['label']} ") and " since " in lines[0]
        assert lines[1].startswith("L: ") and abs(float(lines[1].split()[-2]) - f["long_axis_mm"]) <= 0.01
        assert lines[2].startswith("W: ") and abs(float(lines[2].split()[-2]) - f["short_axis_mm"]) <= 0.01
        assert lines[3].startswith("Volume: ") and abs(float(lines[3].split()[-2]) - f["volume_mm3"]) <= 0.1
        probability = float(lines[4].removeprefix("Probability of cancer: ").split()[0])
        assert lines[4].endswith(" %") and abs(probability - 100 * f["malignancy_probability"]) <= 0.01


def test_the_editable_sr_becomes_one_tracked_bidirectional_measurement_per_current_node(
    followed, tracked
) -> None:
    """`results.editable_in_ohif`: OHIF takes each current node's axes over as a measurement
    the radiologist can keep or correct, named with its line (and change); gone nodes and
    the response become none."""
    current = {n["label"]: n for n in followed["doc"]["nodes"]}
    measurements = tracked["measurements"]
    assert [m["tool"] for m in measurements] == ["Bidirectional"] * len(current)
    for m in measurements:
        f = current[m["label"].split(" ")[0]]
        assert f" since {PRIOR_DATE}" in m["label"]
        long_text, short_text = m["primary"][:2]
        assert long_text.startswith("L: ") and short_text.startswith("W: ")
        assert abs(float(long_text.split()[1]) - f["long_axis_mm"]) <= 0.06
        assert abs(float(short_text.split()[1]) - f["short_axis_mm"]) <= 0.06
    assert tracked["page_errors"] == []


def test_gone_nodes_are_placed_in_the_prior_frame_and_drawn_nowhere(followed, viewed) -> None:
    gone = {n["prior_tracking_uid"]: n for n in _comparison(followed, "gone")}
    assert set(followed["places"]) == set(gone)  # each with its prior centroid in the SR
    measurements = {m["uid"]: m for m in viewed["sr"]["measurements"]}
    for uid, n in gone.items():
        m = measurements[uid]
        assert not m["loaded"] and m["lines"] == []  # nothing to place on the current CT
        labels = _labels(m)
        names = [name for name, _ in labels]
        assert names == ["Short Axis", "Long Axis", "Volume", "Time Point Order", "Time Point Order"]
        assert [value for _, value in labels[3:]] == ["1.00 1", "2.00 1"]  # prior values; absent now
        assert abs(_number(labels[0][1], "mm") - n["short_axis_mm"]["prior"]) <= 0.01
        assert abs(_number(labels[2][1], "mm3") - n["volume_mm3"]["prior"]) <= 0.1
    assert not set(gone) & {a["uid"] for a in viewed["sr"]["annotations"]}
    # once the prior study is open, OHIF places them on one of its display sets (same frame
    # of reference) ...
    placed = {p["uid"]: p for p in viewed["placed"]}
    for uid in gone:
        assert placed[uid]["coords"] == ["SCOORD3D POINT"] and placed[uid]["on"] in viewed["prior_sets"]
    # ... but draws nothing for them on the prior CT, at the node's own slice
    assert viewed["prior_slice_offset_mm"] < 1.0
    assert viewed["gone_shown"] not in viewed["svg_prior"]["texts"]


def test_the_response_is_no_measurement(followed, viewed) -> None:
    """The study's RECIST response is in the report's Qualitative Evaluations, which OHIF
    does not read: its measurements are the nodes, current and gone, and nothing else."""
    nodes = {n["tracking_uid"] for n in followed["doc"]["nodes"]}
    assert {m["uid"] for m in viewed["sr"]["measurements"]} == nodes | set(followed["places"])
    response = followed["doc"]["comparison"]["summary"]["recist_response"]
    labels = [entry["label"] for m in viewed["sr"]["measurements"] for entry in m["labels"]]
    assert not any("RECIST" in label or f": {response}" in label for label in labels)


def test_stepping_through_the_measurements_shows_every_current_node(followed, viewed) -> None:
    """One step per measurement, round to the first again: a step to a current node shows
    its slice and lines; a step to a gone node leaves the view as it was."""
    order = [m["uid"] for m in viewed["sr"]["measurements"]]
    current = {n["tracking_uid"] for n in followed["doc"]["nodes"]}
    steps = viewed["steps"]
    assert len(steps) == len(order) == len(current) + len(followed["places"])
    before = viewed["slice_before_steps"]
    for n, step in enumerate(steps):
        target = order[(n + 1) % len(order)]
        assert step["lines"] == 2 * len(step["texts"])
        if target in current:
            assert target in step["texts"], (n, target)
        else:
            assert step["slice"] == before, n
        before = step["slice"]


def test_no_uncaught_error_in_the_page(viewed) -> None:
    assert viewed["page_errors"] == []
    assert [e for e in viewed["console_errors"] if "Uncaught" in e] == []


def test_screenshots_were_taken(viewed, tracked) -> None:
    names = (
        "followup-sr.png",
        "followup-sr-new.png",
        "followup-sr-matched.png",
        "followup-prior-ct.png",
        "followup-sr-tracked.png",
    )
    for name in names:
        assert (SCREENSHOTS / name).stat().st_size > 10_000, name
