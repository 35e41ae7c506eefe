"""The result objects of a follow-up: SR time points, prior values, changes, response; the
tracking UIDs carried over; the prior beside the current in the result images."""

from __future__ import annotations

import dataclasses
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference import rules
from inference.dicom_volume import load_series
from inference.followup import FROM_SR, PriorNode, PriorStudy, compare
from sr_templates import build_results, codes, read_prior_nodes, write_results
from sr_templates.followup import summary_text
from sr_templates.prior_images import changed, gone_text, prior_lines
from tests.helpers.sr_case import DSRDUMP, NodeSpec, dciodvfy, make_case, needs_dciodvfy, needs_dsrdump

NODES = (
    NodeSpec((10.0, 30.0, 24.0), (6.0, 9.0, 10.0), 0.82, "pathological target (>=15 mm)"),
    NodeSpec((6.0, 44.0, 46.0), (4.0, 3.0, 3.2), 0.21, "normal (<10 mm)"),
)
PRIOR_STUDY = "1.2.826.0.1.3680043.10.1138.17"
PRIOR_DATE = "20250105"
GONE_AT = (-16.5, -17.6, -65.0)  # LPS mm: fat in the case's CT
ALLOWED_WARNINGS = ("Unrecognized defined term <99NODAL>",)


@pytest.fixture(scope="module")
def followup(tmp_path_factory):
    return _compared(tmp_path_factory.mktemp("followup"))


def _compared(folder, *, cut: bool = False):
    """The case compared with its prior and written. LN-1 grew from 14 to 18 mm short axis;
    LN-3 is gone (fat at its place now); LN-2 is new: the same CT stands in for the prior's,
    without LN-2. `cut`: both prior nodes reached the edge of the prior scan."""
    case = make_case(folder, nodes=NODES, uid_seed="nodal-followup-sr")
    volume = load_series(case.datasets)
    f = case.findings.findings
    prior = _prior(f[0].centroid_lps_mm, _without(volume, f[1]))
    if cut:
        prior = dataclasses.replace(
            prior, nodes=tuple(dataclasses.replace(n, at_scan_edge=True) for n in prior.nodes)
        )
    comparison = compare(prior, volume, case.findings)
    paths = write_results(
        case.datasets, case.findings, folder / "out", comparison=comparison, prior_sources=volume
    )
    return case, comparison, {p.name: p for p in paths}


def _prior(ln1_at, volume) -> PriorStudy:
    """The prior study: LN-1 of 14 mm at `ln1_at`, LN-3 of 16 mm at `GONE_AT`, and its CT."""
    return PriorStudy(
        study_instance_uid=PRIOR_STUDY,
        series_instance_uid=PRIOR_STUDY + ".1",
        study_date=PRIOR_DATE,
        nodes=(
            PriorNode("LN-1", PRIOR_STUDY + ".9.1", ln1_at, 14.0, 17.0, 1500.0, 0.7),
            PriorNode("LN-3", PRIOR_STUDY + ".9.3", GONE_AT, 16.0, 20.0, 2500.0, 0.9),
        ),
        volume=volume,
        source=FROM_SR,
    )


def _without(volume, finding):
    """`volume` with `finding`'s voxels turned to fat."""
    array = np.array(volume.array, copy=True)
    k0, j0, i0, k1, j1, i1 = finding.bbox
    array[k0:k1, j0:j1, i0:i1][finding.mask] = -100.0
    return dataclasses.replace(volume, array=array)


@pytest.fixture(scope="module")
def at_edge(tmp_path_factory):
    """As `followup`, but both prior nodes were cut by the edge of the prior scan."""
    return _compared(tmp_path_factory.mktemp("edge"), cut=True)


def test_prior_nodes_cut_by_the_prior_scan_are_no_targets_and_said_so(at_edge) -> None:
    _, comparison, paths = at_edge
    # LN-3 (16 mm) would be the target (test_comparison_of_the_case); cut, it is a non-target
    assert {n.prior_label: n.recist_role for n in comparison.nodes if n.prior_label} == {
        "LN-1": "non-target",
        "LN-3": "non-target",
    }
    s = comparison.summary
    assert (s.target_response, s.non_target_response) == ("", "non-CR/non-PD")
    assert s.recist_response == "non-CR/non-PD"
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    for uid in (PRIOR_STUDY + ".9.1", PRIOR_STUDY + ".9.3"):
        prior_group = next(g for g in groups if _uid(g) == uid and _order(g) == 1)
        assert "cut by the edge of the prior scan" in _child(prior_group, "121106")[0].TextValue
        role = _child(prior_group, codes.BASELINE_CATEGORY.value)[0].ConceptCodeSequence[0]
        assert role.CodeValue == codes.NON_TARGET_AT_BASELINE.value


@needs_dciodvfy
def test_the_sr_with_cut_prior_nodes_passes_dciodvfy(at_edge) -> None:
    errors, warnings = dciodvfy(at_edge[2]["sr.dcm"])
    assert errors == [], errors
    assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings


@pytest.fixture(scope="module")
def looked(tmp_path_factory):
    """The model missed LN-2 in the prior (its CT shows it) and missed LN-3 now (the current
    CT shows it, smaller): both measured at their places."""
    return _looked(tmp_path_factory.mktemp("looked"))


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """As `looked`, but the model's judge (its checker) refuses what the looks measured."""
    return _looked(tmp_path_factory.mktemp("refused"), judge=lambda *_: False)


def _looked(folder, judge=None):
    case = make_case(folder, nodes=NODES, uid_seed="nodal-followup-sr")
    volume = load_series(case.datasets)
    f = case.findings.findings
    array = np.array(volume.array, copy=True)
    kji = np.linalg.solve(volume.affine[:3, :3], np.asarray(GONE_AT) - volume.affine[:3, 3])
    grid = np.indices(array.shape) - kji[:, None, None, None]
    mm = grid * np.asarray(volume.spacing)[:, None, None, None]
    array[np.sum(mm**2, axis=0) <= 6.0**2] = 45.0  # LN-3 now: 12 mm
    current_volume = dataclasses.replace(volume, array=array)
    comparison = compare(_prior(f[0].centroid_lps_mm, volume), current_volume, case.findings, judge=judge)
    paths = write_results(
        case.datasets, case.findings, folder / "out", comparison=comparison, prior_sources=volume
    )
    return case, comparison, {p.name: p for p in paths}


def test_nodes_the_model_missed_are_measured_at_their_place_and_said_so(looked) -> None:
    case, comparison, paths = looked
    new = next(n for n in comparison.nodes if n.current_label == "LN-2")
    gone = next(n for n in comparison.nodes if n.prior_label == "LN-3")
    assert new.look is not None and new.look.outcome == "measured" and new.short_axis_mm_prior is not None
    assert gone.look is not None and gone.look.outcome == "measured"
    assert gone.short_axis_mm_current == pytest.approx(12.0, abs=1.5)
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    then = [g for g in groups if _uid(g) == case.findings.findings[1].tracking_uid and _order(g) == 1]
    now = [g for g in groups if _uid(g) == PRIOR_STUDY + ".9.3" and _order(g) == 2]
    assert len(then) == 1 and len(now) == 1
    for group in then + now:
        shorts = [i for i in _child(group, codes.SHORT_AXIS.value) if i.MeasuredValueSequence[0]]
        assert shorts and "measured by nodal at its registered place" in _child(group, "121106")[0].TextValue
    text = summary_text(comparison)
    assert "LN-3: not found by the model on the current CT, measured at its place" in text
    assert "LN-2: not found by the model on the prior CT, measured at its place" in text


def test_a_size_measured_at_the_place_against_the_scan_edge_is_said_to_be_in_part(looked, tmp_path) -> None:
    case, comparison, _ = looked
    nodes = tuple(
        dataclasses.replace(n, look=dataclasses.replace(n.look, at_scan_edge=True))
        if n.prior_label == "LN-3" and n.look is not None
        else n
        for n in comparison.nodes
    )
    cut = dataclasses.replace(comparison, nodes=nodes)
    assert "LN-3: not found by the model on the current CT, measured at its place (cut by the edge" in (
        summary_text(cut)
    )
    paths = {p.name: p for p in write_results(case.datasets, case.findings, tmp_path, comparison=cut)}
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    [now] = [g for g in groups if _uid(g) == PRIOR_STUDY + ".9.3" and _order(g) == 2]
    assert "cut by the edge of the scan, measured in part" in _child(now, "121106")[0].TextValue


def test_the_images_say_which_sizes_the_scan_edge_cut(looked, at_edge) -> None:
    """The prior-beside-current images carry the SR's remark on their own line: a gone node
    measured at its place against the current edge, a new node's look against the prior
    edge, a prior node cut by the prior scan; and nothing where no edge cut the size."""
    remark = "cut by the edge of the scan, measured in part"
    _, comparison, _ = looked
    gone = next(n for n in comparison.nodes if n.prior_label == "LN-3")
    new = next(n for n in comparison.nodes if n.current_label == "LN-2")
    assert not any(remark in line for line in [*gone_text(gone)[1], *prior_lines(new, PRIOR_DATE)])
    cut_gone = dataclasses.replace(gone, look=dataclasses.replace(gone.look, at_scan_edge=True))
    cut_new = dataclasses.replace(new, prior_at_scan_edge=True)  # what the comparison sets for a cut look
    assert gone_text(cut_gone)[1][1:] == [f"LN-3: {remark}"]
    thick = rules.thick_slices_remark(5.0, 2.5)  # the current study's remark comes last
    assert gone_text(cut_gone, (thick,))[1][1:] == [f"LN-3: {remark}", thick]
    assert prior_lines(cut_new, PRIOR_DATE)[1:] == [f"LN-2: {remark}"]
    matched = next(n for n in at_edge[1].nodes if n.prior_label == "LN-1" and n.current_label)
    assert matched.prior_at_scan_edge and prior_lines(matched, PRIOR_DATE)[1:] == [f"LN-1: {remark}"]


def test_a_structure_the_checker_refuses_is_no_node_and_said_so(refused) -> None:
    _, comparison, paths = refused
    gone = next(n for n in comparison.nodes if n.prior_label == "LN-3")
    new = next(n for n in comparison.nodes if n.current_label == "LN-2")
    for n in (gone, new):
        assert n.look is not None and n.look.outcome == "look-alike"
    assert gone.short_axis_mm_current is None and new.short_axis_mm_prior is None
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    now = [g for g in groups if _uid(g) == PRIOR_STUDY + ".9.3" and _order(g) == 2]
    assert [i.ConceptCodeSequence[0].CodeValue for g in now for i in _child(g, "121052")] == [
        codes.ABSENT.value
    ]
    assert "LN-3: not found by the model on the current CT; soft tissue there" in summary_text(comparison)
    assert "takes it for a look-alike, not a node" in summary_text(comparison)


@needs_dciodvfy
@pytest.mark.parametrize("looks", ["looked", "refused"])
def test_the_looked_sr_passes_dciodvfy(looks, request) -> None:
    _, _, paths = request.getfixturevalue(looks)
    errors, warnings = dciodvfy(paths["sr.dcm"])
    assert errors == [], errors
    assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings


def test_the_reader_skips_a_node_given_by_numbers_alone(looked) -> None:
    """LN-3 measured at its place now has no segment and no line: no finding of this study."""
    case, _, paths = looked
    nodes = read_prior_nodes(pydicom.dcmread(paths["sr.dcm"]), pydicom.dcmread(paths["seg.dcm"]))
    assert PRIOR_STUDY + ".9.3" not in {n.tracking_uid for n in nodes}
    assert len(nodes) == len(case.findings.findings)


def test_comparison_of_the_case(followup) -> None:
    _, comparison, _ = followup
    statuses = {(n.status, n.current_label or n.prior_label) for n in comparison.nodes}
    assert statuses == {("matched", "LN-1"), ("new", "LN-2"), ("gone", "LN-3")}
    # the only target, LN-3 (16 mm), is gone: targets CR; the non-target LN-1 (14 mm at
    # baseline) is 18 mm now: non-CR/non-PD; LN-2 is new but < 10 mm (no lesion): overall PR
    s = comparison.summary
    assert (s.target_response, s.non_target_response, s.recist_response) == ("CR", "non-CR/non-PD", "PR")


@needs_dciodvfy
def test_every_object_passes_dciodvfy(followup) -> None:
    _, _, paths = followup
    for path in paths.values():
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings


@needs_dsrdump
def test_dsrdump_reads_the_sr(followup) -> None:
    _, _, paths = followup
    run = subprocess.run([DSRDUMP, str(paths["sr.dcm"])], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "Time Point Order" in run.stdout and "RECIST 1.1" in run.stdout


def _groups(sr) -> list:
    root = sr.ContentSequence
    measurements = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def _child(group, code: str) -> list:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code]


def _uid(group) -> str:
    return str(_child(group, "112040")[0].UID)


def _order(group) -> int | None:
    items = _child(group, "126073")
    return int(float(items[0].MeasuredValueSequence[0].NumericValue)) if items else None


def test_matched_node_keeps_prior_tracking_uid_in_sr_and_seg(followup) -> None:
    case, _, paths = followup
    prior_uid = PRIOR_STUDY + ".9.1"
    seg = pydicom.dcmread(paths["seg.dcm"])
    assert seg.SegmentSequence[0].TrackingUID == prior_uid
    assert seg.SegmentSequence[1].TrackingUID == case.findings.findings[1].tracking_uid  # new: its own
    groups = [g for g in _groups(pydicom.dcmread(paths["sr.dcm"])) if _uid(g) == prior_uid]
    # the axes now (a time point without its order, for OHIF: test_..._time_points_...),
    # the prior values, the volume now
    assert sorted(_order(g) or 0 for g in groups) == [0, 1, 2]


def test_prior_values_changes_and_roles_are_coded(followup) -> None:
    _, comparison, paths = followup
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    prior_uid = PRIOR_STUDY + ".9.1"
    prior_group = next(g for g in groups if _uid(g) == prior_uid and _order(g) == 1)
    values = {
        i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
        for i in prior_group.ContentSequence
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue != "126073"
    }
    assert values == {codes.SHORT_AXIS.value: 14.0, codes.LONG_AXIS.value: 17.0, codes.VOLUME.value: 1500.0}
    volumetric = next(g for g in groups if _uid(g) == prior_uid and _child(g, "121191"))
    changes = [
        i
        for i in volumetric.ContentSequence
        if i.ValueType == "NUM"
        and i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
        and i.ConceptNameCodeSequence[0].CodeValue == codes.SHORT_AXIS.value
    ]
    assert len(changes) == 1
    derivation = changes[0].ContentSequence[0].ConceptCodeSequence[0]
    assert (derivation.CodeValue, derivation.CodingSchemeDesignator) == ("125314", "DCM")
    node = next(n for n in comparison.nodes if n.prior_tracking_uid == prior_uid)
    assert float(changes[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        node.short_axis_change_percent, abs=1e-4
    )
    role = _child(volumetric, codes.BASELINE_CATEGORY.value)[0].ConceptCodeSequence[0]
    assert role.CodeValue == codes.NON_TARGET_AT_BASELINE.value  # 14 mm at baseline
    comment = _child(next(g for g in groups if _uid(g) == prior_uid and _child(g, "121106")), "121106")[0]
    assert "SA 14.0 ->" in comment.TextValue and f"since {PRIOR_DATE}" in comment.TextValue


def test_new_and_gone_nodes_are_marked_absent_at_the_other_time(followup) -> None:
    case, _, paths = followup
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))

    def absent(uid: str) -> list[int]:
        return [
            _order(g) or 0
            for g in groups
            if _uid(g) == uid
            and any(i.ConceptCodeSequence[0].CodeValue == codes.ABSENT.value for i in _child(g, "121052"))
        ]

    assert absent(case.findings.findings[1].tracking_uid) == [1]  # new: absent at the prior time
    assert absent(PRIOR_STUDY + ".9.3") == [2]  # gone: absent now


def test_gone_node_keeps_its_prior_values_at_its_prior_place(followup) -> None:
    case, _, paths = followup
    groups = _groups(pydicom.dcmread(paths["sr.dcm"]))
    gone_uid = PRIOR_STUDY + ".9.3"
    [prior] = [g for g in groups if _uid(g) == gone_uid and _order(g) == 1]
    assert prior.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    [surface] = [i for i in prior.ContentSequence if i.ValueType == "SCOORD3D"]
    assert surface.GraphicType == "POINT"
    assert [float(v) for v in surface.GraphicData] == pytest.approx(list(GONE_AT), abs=1e-4)
    # the prior's frame of reference (here the same CT stands in for the prior's images)
    assert surface.ReferencedFrameOfReferenceUID == case.datasets[0].FrameOfReferenceUID
    [source] = _child(prior, "121232")  # Source Series for Segmentation: the prior CT series
    assert source.UID == PRIOR_STUDY + ".1"
    values = {
        i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
        for i in prior.ContentSequence
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue != "126073"
    }
    assert values == {codes.SHORT_AXIS.value: 16.0, codes.LONG_AXIS.value: 20.0, codes.VOLUME.value: 2500.0}


def test_every_node_in_imaging_measurements_has_a_place(followup) -> None:
    """Groups merged by tracking UID (as OHIF merges them) each hold a coordinate: OHIF 3.13
    stops loading an SR at a node without any (docs/follow-up.md, "In OHIF")."""
    _, _, paths = followup
    places: dict[str, bool] = {}

    def has_coordinates(items) -> bool:
        return any(
            i.ValueType in ("SCOORD", "SCOORD3D") or has_coordinates(i.get("ContentSequence", []))
            for i in items
        )

    for g in _groups(pydicom.dcmread(paths["sr.dcm"])):
        places[_uid(g)] = places.get(_uid(g), False) or has_coordinates(g.ContentSequence)
    assert len(places) == 3 and all(places.values()), places


def test_time_points_follow_the_values_and_the_first_number_holds_the_lines(followup) -> None:
    """Time point contexts close each group (the order of TID 1501/1411 is not significant):
    OHIF takes a group's first NUM as the one with the lines when it takes an editable SR
    over, and lists a node's values in document order. The current axes' time point has no
    order (optional in TID 1502): OHIF draws a node's first five values beside its lines, and
    an order there would take the probability's place; the node's volume group has it."""
    case, comparison, _ = followup
    sr = build_results(
        case.datasets, case.findings, comparison=comparison, editable_in_ohif=True, result_images=False
    ).sr
    for group in _groups(sr):
        names = [i.ConceptNameCodeSequence[0].CodeValue for i in group.ContentSequence]
        nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        if _child(group, "112039")[0].TextValue.startswith("Cornerstone3DTools"):  # the axes
            assert names[-1] == "C2348792" and "126073" not in names, names  # Time Point alone
            assert nums[0].ConceptNameCodeSequence[0].CodeValue == codes.LONG_AXIS.value
            assert nums[0].ContentSequence[0].ValueType == "SCOORD"
        else:
            assert names[-2:] == ["C2348792", "126073"], names  # Time Point, Time Point Order


@needs_dciodvfy
def test_a_follow_up_on_thick_slices_says_so_beside_its_response(followup, tmp_path) -> None:
    """The study's remark joins the response's Qualitative Evaluations container: one
    container, the response's Comment first, the current CT's remark named so. The prior
    CT's remark (its slices too far apart: a small new node may be older) is in the
    response's Comment, ends the small new node's Comment and its prior panel."""
    case, comparison, _ = followup
    model = dataclasses.replace(case.findings.model, max_slice_spacing_mm=2.0)  # the CT: 2.5 mm apart
    thick = dataclasses.replace(case.findings, model=model)
    older = f"prior CT: {rules.thick_slices_remark(2.5, 2.0)}"
    comparison = dataclasses.replace(comparison, prior_remarks=(older,))
    paths = write_results(
        case.datasets, thick, tmp_path, comparison=comparison, prior_sources=load_series(case.datasets)
    )
    sr = pydicom.dcmread(next(p for p in paths if p.name == "sr.dcm"))
    [container] = [
        i
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    assert [i.TextValue for i in container.ContentSequence if i.ValueType == "TEXT"] == [
        summary_text(comparison),
        f"current CT: {rules.thick_slices_remark(2.5, 2.0)}",  # beside the prior CT's: which is which
    ]
    assert f"1 matched, 1 new, 1 gone; {older}" in summary_text(comparison)  # before the long parts
    new = next(n for n in comparison.nodes if n.current_label == "LN-2")
    comments = [
        _child(g, "121106")[0].TextValue
        for g in _groups(sr)
        if _uid(g) == new.current_tracking_uid and _child(g, "121106")
    ]
    assert comments and all(c.endswith(f"new since {PRIOR_DATE}; {older}") for c in comments)
    matched = next(n for n in comparison.nodes if n.current_label == "LN-1")
    assert not any(
        older in _child(g, "121106")[0].TextValue
        for g in _groups(sr)
        if _uid(g) == matched.prior_tracking_uid and _child(g, "121106")
    )
    assert new.short_axis_mm_current < 10  # small: the prior's thick slices may have hidden it
    assert prior_lines(new, PRIOR_DATE, comparison.prior_remarks)[-1] == older
    assert older not in prior_lines(matched, PRIOR_DATE, comparison.prior_remarks)
    big = dataclasses.replace(new, short_axis_mm_current=12.0)  # thick slices hide no 12 mm node
    assert older not in prior_lines(big, PRIOR_DATE, comparison.prior_remarks)
    assert dciodvfy(next(p for p in paths if p.name == "sr.dcm"))[0] == []


def test_the_response_is_a_qualitative_evaluation_of_the_report(followup) -> None:
    _, comparison, paths = followup
    sr = pydicom.dcmread(paths["sr.dcm"])
    [container] = [
        i
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    assert container.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    assert [i.ValueType for i in container.ContentSequence] == ["CODE", "CODE", "CODE", "TEXT"]
    method = _child(container, codes.RESPONSE_EVALUATION_METHOD.value)[0].ConceptCodeSequence[0]
    assert method.CodeValue == codes.RECIST_1_1.value
    responses = {i.ConceptCodeSequence[0].CodeValue for i in _child(container, codes.CURRENT_RESPONSE.value)}
    assert responses == {
        codes.TARGET_RESPONSES["CR"].value,
        codes.NON_TARGET_RESPONSES["non-CR/non-PD"].value,
    }
    text = _child(container, "121106")[0].TextValue
    assert text.startswith(f"Nodal response (RECIST 1.1) vs prior {PRIOR_DATE}: PR")
    s = comparison.summary
    assert (
        f"sum of target short axes {s.sum_short_axis_prior_mm:.1f} -> {s.sum_short_axis_current_mm:.1f} mm"
        in text
    )
    assert not any(_child(g, codes.RESPONSE_EVALUATION_METHOD.value) for g in _groups(sr))


def test_highdicom_reads_it_back(followup) -> None:
    _, _, paths = followup
    sr = hd.sr.srread(paths["sr.dcm"])
    groups = sr.content.get_volumetric_roi_measurement_groups(tracking_uid=PRIOR_STUDY + ".9.1")
    assert len(groups) == 1
    names = {m.name.value for m in groups[0].get_measurements()}
    assert codes.SHORT_AXIS.value in names  # the relative change, beside volume and probability


def test_reader_takes_the_current_values_not_the_prior(followup) -> None:
    case, _, paths = followup
    nodes = read_prior_nodes(pydicom.dcmread(paths["sr.dcm"]), pydicom.dcmread(paths["seg.dcm"]))
    by_uid = {n.tracking_uid: n for n in nodes}
    assert set(by_uid) == {PRIOR_STUDY + ".9.1", case.findings.findings[1].tracking_uid}  # gone LN-3 not
    grown = by_uid[PRIOR_STUDY + ".9.1"]
    assert grown.short_axis_mm == pytest.approx(case.findings.findings[0].short_axis.length_mm, abs=1e-4)


def test_reader_knows_the_prior_values_by_their_time_point_text_without_an_order(followup) -> None:
    """TID 1502 makes the Time Point Order optional: without it, "prior <date>" says it."""
    case, _, paths = followup
    sr = pydicom.dcmread(paths["sr.dcm"])
    dropped = 0
    for group in _groups(sr):
        orders = _child(group, "126073")
        for item in orders:
            group.ContentSequence.remove(item)
            dropped += 1
    assert dropped >= 2  # the prior values' groups and the current volume groups had one
    nodes = read_prior_nodes(sr, pydicom.dcmread(paths["seg.dcm"]))
    grown = next(n for n in nodes if n.tracking_uid == PRIOR_STUDY + ".9.1")
    assert grown.short_axis_mm == pytest.approx(case.findings.findings[0].short_axis.length_mm, abs=1e-4)
    assert PRIOR_STUDY + ".9.3" not in {n.tracking_uid for n in nodes}  # gone: prior values only


def test_prior_beside_current_images(followup) -> None:
    case, comparison, paths = followup
    key_images = build_results(case.datasets, case.findings).result_images
    extra = [pydicom.dcmread(p) for name, p in sorted(paths.items()) if name.startswith("sc-")][
        len(key_images) :
    ]
    assert len(extra) == sum(changed(n) for n in comparison.nodes) == 3
    for ds in extra:
        rows, cols = ds.Rows, ds.Columns
        assert cols > 2 * rows * 0.95  # two panels side by side
        assert np.asarray(ds.pixel_array).shape == (rows, cols, 3)


def test_follow_up_objects_have_their_own_uids(followup) -> None:
    case, _, paths = followup
    alone = build_results(case.datasets, case.findings, result_images=False)
    assert pydicom.dcmread(paths["sr.dcm"]).SOPInstanceUID != alone.sr.SOPInstanceUID
    assert pydicom.dcmread(paths["seg.dcm"]).SOPInstanceUID != alone.seg.SOPInstanceUID
