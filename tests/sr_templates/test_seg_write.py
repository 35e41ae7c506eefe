"""The SEG: one segment per node, right codes and provenance, pixels where the nodes are."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from sr_templates import build_results, codes, write_results
from sr_templates.seg import segment_rgb
from tests.helpers.sr_case import MODEL, SPACING, NodeSpec, make_case


@pytest.fixture(scope="module")
def seg(case) -> hd.seg.Segmentation:
    paths = write_results(case.datasets, case.findings, case.folder / "out", result_images=False)
    assert paths[0].name == "seg.dcm"
    return hd.seg.segread(paths[0])


def test_one_segment_per_finding_in_findings_order(case, seg) -> None:
    findings = case.findings.findings
    assert seg.segment_numbers == list(range(1, len(findings) + 1))
    for number, finding in enumerate(findings, start=1):
        d = seg.get_segment_description(number)
        assert d.segment_label == finding.label
        assert d.tracking_id == finding.label
        assert d.tracking_uid == finding.tracking_uid
        assert d.segmented_property_category == codes.ANATOMICAL_STRUCTURE
        assert d.segmented_property_type == codes.LYMPH_NODE
        assert d.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = d.algorithm_identification[0]
        assert algorithm.AlgorithmName == MODEL.name
        assert algorithm.AlgorithmVersion == MODEL.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        lab = d.RecommendedDisplayCIELabValue
        rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
        assert np.allclose(rgb, segment_rgb(number - 1), atol=2)


def test_same_study_and_frame_of_reference_new_series_labelled_as_ai(case, seg) -> None:
    source = case.datasets[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SegmentationType == "BINARY"
    assert "AI" in seg.SeriesDescription and "unverified" in seg.SeriesDescription
    assert seg.Manufacturer == codes.MANUFACTURER
    assert seg.ManufacturerModelName == codes.MODEL_NAME
    assert list(seg.SoftwareVersions) == [codes.SOFTWARE_VERSION, f"{MODEL.name} {MODEL.version}"]
    ours = [item for item in seg.ContributingEquipmentSequence if item.Manufacturer == codes.MANUFACTURER]
    assert len(ours) == 1
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert MODEL.version in " ".join(ours[0].SoftwareVersions)


def test_segment_pixels_land_on_their_nodes(case, seg) -> None:
    """Each segment, mapped to patient space by the SEG's own geometry, is its node."""
    voxel = max(SPACING)
    for number, finding in enumerate(case.findings.findings, start=1):
        volume = seg.get_volume(segment_numbers=[number], combine_segments=False)
        mask = volume.array[..., 0] > 0
        assert int(mask.sum()) == int(finding.mask.sum())
        kji = np.argwhere(mask).astype(float)
        lps = kji @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        centroid = lps.mean(axis=0)
        assert np.linalg.norm(centroid - np.array(finding.centroid_lps_mm)) <= voxel


def test_frames_reference_the_source_slice_at_their_position(case, seg) -> None:
    by_uid = {ds.SOPInstanceUID: ds for ds in case.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        ct = by_uid[source.ReferencedSOPInstanceUID]
        assert np.allclose(position, [float(v) for v in ct.ImagePositionPatient])


def test_empty_frames_are_omitted_unless_asked_for(case) -> None:
    findings = case.findings.findings
    nonempty = sum(int(f.mask[dk].any()) for f in findings for dk in range(f.mask.shape[0]))
    omitted = build_results(case.datasets, case.findings, result_images=False).seg
    full = build_results(case.datasets, case.findings, result_images=False, omit_empty_frames=False).seg
    assert omitted.NumberOfFrames == nonempty
    assert full.NumberOfFrames == len(case.datasets) * len(findings)


def test_segments_never_overlap_and_name_their_creator(seg) -> None:
    assert seg.SegmentsOverlap == "NO"
    assert str(seg.ContentCreatorName) == f"{MODEL.name}^{MODEL.version}"


def test_overlapping_findings_are_refused(tmp_path: Path) -> None:
    """Viewers lose segments of a SEG whose segments share voxels (OHIF: only 2 of 9 kept),
    so findings that share a voxel are an error at the writer, not an overlapping SEG."""
    nodes = (
        NodeSpec((10.0, 30.0, 30.0), (6.0, 6.0, 6.0), 0.5, "normal"),
        NodeSpec((10.0, 30.0, 36.0), (6.0, 6.0, 6.0), 0.5, "normal"),
    )
    case = make_case(tmp_path, nodes=nodes)
    with pytest.raises(ValueError, match=r"LN-2 and LN-1 share voxels.*must not overlap"):
        build_results(case.datasets, case.findings, result_images=False)
