"""The TID 1500 SR: groups tied to their segments, values equal to the findings, flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from sr_templates import build_results, codes, write_results
from sr_templates.sources import prepare_sources
from sr_templates.sr import document_arguments, measurement_report
from sr_templates.uids import ResultUIDs
from tests.helpers.sr_case import DSRDUMP, MODEL, dciodvfy, make_case, needs_dciodvfy, needs_dsrdump


@pytest.fixture(scope="module")
def written(case) -> dict[str, Path]:
    paths = write_results(case.datasets, case.findings, case.folder / "out", result_images=False)
    return {p.name: p for p in paths}


@pytest.fixture(scope="module")
def sr(written) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(written["sr.dcm"])


@pytest.fixture(scope="module")
def seg(written) -> hd.seg.Segmentation:
    return hd.seg.segread(written["seg.dcm"])


def _values(group) -> dict[str, tuple[float, str]]:
    return {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}


def _evaluations(group) -> dict[str, str]:
    return {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}


def test_document_flags_and_template(sr) -> None:
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "AI" in sr.SeriesDescription and "unverified" in sr.SeriesDescription
    assert list(sr.SoftwareVersions)[1] == f"{MODEL.name} {MODEL.version}"


def _text(item, code: str) -> list[str]:
    """Values of the direct children of `item` whose concept name has code value `code`."""
    return [
        str(child.get("TextValue", child.get("UID", "")))
        for child in item.ContentSequence
        if child.ConceptNameCodeSequence[0].CodeValue == code
    ]


def test_device_observer_identifies_the_algorithm(sr) -> None:
    (context,) = sr.content.get_observer_contexts(observer_type=codes.DEVICE)
    attrs = context.observer_identifying_attributes
    assert attrs.name == f"{MODEL.name} {MODEL.version}"
    assert attrs.manufacturer_name == codes.MANUFACTURER
    assert attrs.model_name == codes.MODEL_NAME


def test_every_node_has_one_tracking_uid_across_its_groups(case, sr, seg) -> None:
    """OHIF merges a node's groups by tracking UID: each node has exactly two groups, the
    TID 1501 group with its axes and the TID 1411 group with its segment."""
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    axes = sr.content.get_image_measurement_groups()
    assert sr.content.get_planar_roi_measurement_groups() == []  # no group-level SCOORD
    findings = case.findings.findings
    assert len(volumetric) == len(axes) == len(findings)
    segment_uid = {n: seg.get_segment_description(n).tracking_uid for n in seg.segment_numbers}
    for number, (finding, group, axes_group) in enumerate(zip(findings, volumetric, axes, strict=True), 1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
        assert group.tracking_uid == axes_group.tracking_uid == segment_uid[number] == finding.tracking_uid
        assert group.tracking_identifier == axes_group.tracking_identifier == finding.label
        assert group.finding_type == axes_group.finding_type == codes.LYMPH_NODE


def test_measurements_equal_the_findings(case, sr) -> None:
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    axes = sr.content.get_image_measurement_groups()
    for finding, group, axes_group in zip(case.findings.findings, volumetric, axes, strict=True):
        lines = _values(axes_group)
        assert lines == {
            "103339001": (pytest.approx(finding.long_axis.length_mm), "mm"),
            "103340004": (pytest.approx(finding.short_axis.length_mm), "mm"),
        }
        values = _values(group)
        assert values["118565006"] == (pytest.approx(finding.volume_mm3), "mm3")
        assert values["111047"] == (pytest.approx(100 * finding.malignancy_probability), "%")
        assert values["112031"] == (pytest.approx(finding.mean_hu), "[hnsf'U]")
        evaluations = _evaluations(group)
        expected = "21594007" if finding.malignancy_probability >= 0.5 else "30807003"
        assert evaluations["363713009"] == expected
        assert evaluations["112025"] == codes.size_category_code(finding.size_category).value
        for g in (group, axes_group):  # TID 4019 on the group, none on the NUMs
            assert _text(g[0], "111001") == [MODEL.name]  # Algorithm Name
            assert _text(g[0], "111003") == [MODEL.version]  # Algorithm Version
        for measurement in (*group.get_measurements(), *axes_group.get_measurements()):
            children = measurement[0].get("ContentSequence", [])
            assert all(c.ConceptNameCodeSequence[0].CodeValue != "111001" for c in children)


def test_the_call_and_size_class_are_also_said_in_words(case, sr) -> None:
    """OHIF shows no coded evaluation, but it shows a Comment (DCM 121106) as a label."""
    for finding, group in zip(case.findings.findings, sr.content.get_image_measurement_groups(), strict=True):
        (said,) = _text(group[0], "121106")
        call = "malignant" if finding.malignancy_probability >= 0.5 else "benign"
        assert said == f"{finding.label} {call}, size: {finding.size_category}"
        assert said.isascii()


def test_a_node_cut_by_the_edge_of_the_scan_is_said_so(case) -> None:
    from dataclasses import replace

    from inference import rules
    from sr_templates.sr import comment

    finding = case.findings.findings[0]
    cut = replace(finding, flags=(*finding.flags, rules.FLAG_SCAN_EDGE))
    assert comment(cut) == comment(finding) + "; cut by the edge of the scan, measured in part"


def test_axis_measurements_are_inferred_from_their_lines_on_the_key_slice(case, sr) -> None:
    axes = sr.content.get_image_measurement_groups()
    slices = case.findings.slices
    for finding, group in zip(case.findings.findings, axes, strict=True):
        by_code = {m.name.value: m for m in group.get_measurements()}
        for line, code in ((finding.long_axis, "103339001"), (finding.short_axis, "103340004")):
            measurement = by_code[code]
            assert measurement.value == pytest.approx(line.length_mm)
            (scoord,) = measurement.referenced_coordinates  # INFERRED FROM
            assert scoord.relationship_type == hd.sr.RelationshipTypeValues.INFERRED_FROM
            assert scoord.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            assert np.allclose(scoord.value, np.array(line.endpoints_pixel))
            image = scoord.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM
            assert image.ReferencedSOPInstanceUID == slices[finding.key_slice].sop_instance_uid


def test_evidence_lists_every_ct_and_the_seg(case, sr, seg) -> None:
    listed = {uid for _, _, uid, _ in sr.get_evidence()}
    expected = {ds.SOPInstanceUID for ds in case.datasets} | {seg.SOPInstanceUID}
    assert listed == expected


def test_partial_analysis_is_flagged(case) -> None:
    sr = build_results(case.datasets, case.findings, result_images=False, partial=True).sr
    assert sr.CompletionFlag == "PARTIAL"


def test_fast_document_equals_highdicoms_own(case) -> None:
    """`build_sr` avoids highdicom's copy of the content tree; the result must not differ."""
    ours = build_results(case.datasets, case.findings, result_images=False)
    sources = prepare_sources(case.datasets, case.findings)
    uids = ResultUIDs(sources.sop_instance_uids, case.findings.model.version)
    reference = hd.sr.Comprehensive3DSR(
        content=measurement_report(sources, case.findings, ours.seg, uids),
        **document_arguments(sources, case.findings, ours.seg, uids),
    )
    for keyword in (
        "ContentSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "ConceptNameCodeSequence",
        "ContentTemplateSequence",
        "CompletionFlag",
        "VerificationFlag",
    ):
        assert ours.sr[keyword] == reference[keyword], keyword


def test_no_findings_gives_an_sr_that_says_so(tmp_path: Path) -> None:
    case = make_case(tmp_path, nodes=())
    paths = write_results(case.datasets, case.findings, tmp_path / "out")
    assert [p.name for p in paths] == ["sr.dcm", "sc-001.dcm"]
    sr = hd.sr.srread(paths[0])
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    assert groups[0].finding_type == codes.LYMPH_NODE
    assert _evaluations(groups[0]) == {"121052": "272519000"}  # presence: absent
    assert len(sr.get_evidence()) == len(case.datasets)


@needs_dciodvfy
def test_no_findings_on_slices_too_far_apart_says_small_nodes_may_be_missed(tmp_path: Path) -> None:
    """ "No lymph nodes found" on CT whose slices lie further apart than the model finds small
    nodes on (the card's limit): the group's Comment says so, and the SR stays valid."""
    import dataclasses

    case = make_case(tmp_path, nodes=())
    model = dataclasses.replace(MODEL, max_slice_spacing_mm=2.0)  # the test CT: 2.5 mm apart
    findings = dataclasses.replace(case.findings, model=model)
    paths = write_results(case.datasets, findings, tmp_path / "out", result_images=False)
    (group,) = hd.sr.srread(paths[0]).content.get_image_measurement_groups()
    assert _text(group[0], "121106") == ["thick slices (2.5 mm apart, over 2): small nodes may be missed"]
    assert _evaluations(group) == {"121052": "272519000"}  # presence: absent, as before
    assert _study_comments(paths[0]) == ["thick slices (2.5 mm apart, over 2): small nodes may be missed"]
    assert dciodvfy(paths[0])[0] == []
    plain = write_results(case.datasets, case.findings, tmp_path / "plain", result_images=False)
    (group,) = hd.sr.srread(plain[0]).content.get_image_measurement_groups()
    assert _text(group[0], "121106") == []
    assert _study_comments(plain[0]) == []


def _study_comments(path: Path) -> list[str]:
    """The Comments of the report's Qualitative Evaluations container (TID 1500 rows 12, 14)."""
    sr = pydicom.dcmread(path)
    containers = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(containers) <= 1
    return [text for container in containers for text in _text(container, "121106")]


@needs_dciodvfy
def test_nodes_found_on_slices_too_far_apart_the_report_says_small_nodes_may_be_missed(
    case, tmp_path
) -> None:
    """With nodes found the remark is the report's: a Comment in its Qualitative Evaluations
    (TID 1500 row 12), where every SR reader finds it; the node groups are as without it."""
    import dataclasses

    findings = dataclasses.replace(case.findings, model=dataclasses.replace(MODEL, max_slice_spacing_mm=2.0))
    paths = write_results(case.datasets, findings, tmp_path / "out", result_images=False)
    sr_path = next(p for p in paths if p.name == "sr.dcm")
    assert _study_comments(sr_path) == ["thick slices (2.5 mm apart, over 2): small nodes may be missed"]
    assert dciodvfy(sr_path)[0] == []
    groups = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    plain = hd.sr.srread(
        write_results(case.datasets, case.findings, tmp_path / "plain", result_images=False)[1]
    )
    assert [g.tracking_identifier for g in groups] == [
        g.tracking_identifier for g in plain.content.get_image_measurement_groups()
    ]
    assert _study_comments(tmp_path / "plain" / "sr.dcm") == []


@needs_dsrdump
def test_dsrdump_reads_the_sr(written) -> None:
    run = subprocess.run([str(DSRDUMP), str(written["sr.dcm"])], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    assert "Probability of cancer" in run.stdout
    assert not any(line.startswith(("E:", "W:")) for line in run.stderr.splitlines()), run.stderr


def test_the_package_stays_out_of_torch_monai_and_dicom_node() -> None:
    code = (
        "import sys, sr_templates, sr_templates.write, sr_templates.synthetic; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'monai', 'dicom_node')); print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_written_files_are_readable_dicom(written) -> None:
    for path in written.values():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_editable_in_ohif_names_the_bidirectional_tool_on_the_axes_group_only(case) -> None:
    """OHIF offers a group as an editable measurement when its tracking identifier names a
    Cornerstone tool; the node keeps its tracking UID and, on its TID 1411 group, its label."""
    sr = build_results(case.datasets, case.findings, result_images=False, editable_in_ohif=True).sr
    axes = sr.content.get_image_measurement_groups()
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    for finding, a, v in zip(case.findings.findings, axes, volumetric, strict=True):
        assert a.tracking_identifier == "Cornerstone3DTools@^0.1.0:Bidirectional"
        assert v.tracking_identifier == finding.label
        assert a.tracking_uid == v.tracking_uid == finding.tracking_uid
        meanings = {m.name.meaning for m in a.get_measurements()}
        assert meanings == {"Long Axis", "Short Axis"}  # the names OHIF's tool reads


@needs_dciodvfy
def test_editable_in_ohif_stays_valid(case, tmp_path: Path) -> None:
    paths = write_results(case.datasets, case.findings, tmp_path, result_images=False, editable_in_ohif=True)
    errors, _ = dciodvfy(paths[1])
    assert errors == []
