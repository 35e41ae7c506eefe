"""Result images: key slices with contours, labels and an "AI result, not verified" banner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference import rules
from sr_templates import build_results, codes, write_results
from sr_templates.result_images import (
    BANNER_COLOR,
    MAX_LEGEND_LINES,
    MIN_SIZE,
    NO_FINDINGS_TEXT,
    banner_text,
    footer_text,
    key_images,
    legend,
    legend_lines,
)
from sr_templates.seg import segment_rgb
from sr_templates.sources import header_copy
from tests.helpers.sr_case import MODEL, make_case


@pytest.fixture(scope="module")
def images(case) -> list[pydicom.Dataset]:
    paths = write_results(case.datasets, case.findings, case.folder / "out")
    return [pydicom.dcmread(p) for p in paths if p.name.startswith("sc-")]


def test_one_image_per_key_slice_in_its_own_series(case, images) -> None:
    key_slices = {f.key_slice for f in case.findings.findings}
    assert len(images) == len(key_slices)
    source = case.datasets[0]
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    for number, ds in enumerate(images, start=1):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.InstanceNumber == number
        assert ds.BurnedInAnnotation == "YES"
        assert "AI" in ds.SeriesDescription and "unverified" in ds.SeriesDescription
        assert ds.PhotometricInterpretation == "RGB"
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert max(ds.Rows, ds.Columns) >= MIN_SIZE


def test_each_image_references_its_ct_slice(case, images) -> None:
    keys = key_images(case.findings)
    for ds, key in zip(images, keys, strict=True):
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == case.findings.slices[key.k].sop_instance_uid


def test_contours_labels_and_banner_are_drawn(case, images) -> None:
    keys = key_images(case.findings)
    for ds, key in zip(images, keys, strict=True):
        rgb = ds.pixel_array
        scale = ds.Columns // case.findings.shape[2]
        for n, finding in key.findings:
            colour = np.array(segment_rgb(n), dtype=np.uint8)
            _, j0, i0, _, j1, i1 = finding.bbox
            box = rgb[j0 * scale : j1 * scale, i0 * scale : i1 * scale]
            assert np.all(box == colour, axis=-1).sum() > 10, f"no contour of {finding.label}"
        banner = rgb[: ds.Rows // 12]
        assert np.all(banner == np.array(BANNER_COLOR, dtype=np.uint8), axis=-1).any()


def test_banner_names_the_model_and_the_footer_the_software() -> None:
    """A reader must tell the model's version from the package's: the banner has the model,
    the legend's last line the software, each labelled."""
    text = banner_text(MODEL)
    assert "AI RESULT" in text and "NOT VERIFIED" in text
    assert text.endswith(f"model {MODEL.name} {MODEL.version}")
    assert codes.SOFTWARE_VERSION not in text
    assert footer_text() == f"software nodal {codes.SOFTWARE_VERSION}"


def test_no_findings_image_says_so(tmp_path: Path) -> None:
    case = make_case(tmp_path, nodes=())
    results = build_results(case.datasets, case.findings)
    (image,) = results.result_images
    rgb = image.pixel_array
    text = np.all(rgb == np.array(BANNER_COLOR, dtype=np.uint8), axis=-1)
    assert text[: image.Rows // 12].any() and text[-image.Rows // 8 :].any()


def test_result_images_need_pixel_data_but_seg_and_sr_do_not(case) -> None:
    headers = [header_copy(ds) for ds in case.datasets]
    results = build_results(headers, case.findings, result_images=False)
    assert results.seg is not None and results.result_images == ()
    with pytest.raises(ValueError, match="pixel data"):
        build_results(headers, case.findings)


def test_the_legend_says_when_the_scan_edge_cut_a_node(case) -> None:
    """A node cut by the edge of the scan is measured in part; the legend says so on a line
    of its own (the SR's remark), and says nothing of it for a whole node."""
    f = case.findings.findings[0]
    assert len(legend_lines([f])) == 1
    cut = dataclasses.replace(f, flags=(*f.flags, rules.FLAG_SCAN_EDGE))
    assert legend_lines([cut])[1:] == [f"{f.label}: cut by the edge of the scan, measured in part"]
    assert legend_lines([]) == [NO_FINDINGS_TEXT]


def test_a_full_legend_keeps_each_node_whole_and_counts_the_nodes_left_out(case) -> None:
    """Six nodes, the fifth cut (seven lines): the first four nodes whole, not the fifth's
    size without its remark, then how many nodes the SR holds beside them."""
    f = case.findings.findings[0]
    nodes = [dataclasses.replace(f, label=f"LN-{n}") for n in range(1, 7)]
    nodes[4] = dataclasses.replace(nodes[4], flags=(*f.flags, rules.FLAG_SCAN_EDGE))
    lines = legend_lines(nodes)
    assert len(lines) <= MAX_LEGEND_LINES
    assert [line.split(":")[0] for line in lines[:-1]] == ["LN-1", "LN-2", "LN-3", "LN-4"]
    assert lines[-1] == "... and 2 more (see the SR)"
    assert len(legend_lines(nodes[:4] + nodes[5:])) == 5  # five whole nodes fit, none left out
    whole = [dataclasses.replace(f, label=f"LN-{n}") for n in range(1, 8)]  # seven, none cut
    assert legend_lines(whole)[-1] == "... and 2 more (see the SR)"
    assert len(legend_lines(whole)) == MAX_LEGEND_LINES


def test_the_legend_says_when_the_slices_are_too_far_apart_for_small_nodes(case) -> None:
    """Slices further apart than the model's card says it finds small nodes on (the test
    CT's are 2.5 mm apart): a line above the footer says so; at or under the limit, or with
    no limit, nothing is said."""
    key = key_images(case.findings)[0]
    plain = legend(case.findings, key)
    assert plain[-1] == footer_text()
    for limit in (None, 2.5, 3.0):
        sf = dataclasses.replace(case.findings, model=dataclasses.replace(MODEL, max_slice_spacing_mm=limit))
        assert legend(sf, key) == plain and sf.remarks == ()
    thin = dataclasses.replace(case.findings, model=dataclasses.replace(MODEL, max_slice_spacing_mm=2.0))
    said = "thick slices (2.5 mm apart, over 2): small nodes may be missed"
    assert thin.remarks == (said,) and said.isascii()
    assert legend(thin, key) == [*plain[:-1], said, footer_text()]
    doc = thin.to_json()
    assert doc["slice_spacing_mm"] == 2.5 and doc["remarks"] == [said]
    assert case.findings.to_json()["remarks"] == []
    # a spacing that would print as the limit itself is printed finer
    assert rules.thick_slices_remark(2.53, 2.5).startswith("thick slices (2.53 mm apart, over 2.5)")
    # slices close enough but thicker than the limit (5 mm every 2.5 mm) blur small nodes too
    slabs = dataclasses.replace(case.findings, slice_thickness_mm=5.0)
    slabs = dataclasses.replace(slabs, model=dataclasses.replace(MODEL, max_slice_spacing_mm=3.0))
    assert slabs.remarks == ("thick slices (5.0 mm thick, over 3): small nodes may be missed",)
    assert slabs.to_json()["slice_thickness_mm"] == 5.0 and doc["slice_thickness_mm"] is None
    assert dataclasses.replace(slabs, model=thin.model).remarks == (  # the larger of the two is named
        "thick slices (5.0 mm thick, over 2): small nodes may be missed",
    )


def test_slice_remarks_by_spacing_then_thickness() -> None:
    assert rules.slice_remarks(2.5, None, 5.0) == ()  # no limit: nothing to say
    assert rules.slice_remarks(2.5, 2.5, 2.5) == ()
    assert rules.slice_remarks(2.5, 2.5, None) == ()
    assert rules.slice_remarks(5.0, 2.5, 5.0) == (
        "thick slices (5.0 mm apart, over 2.5): small nodes may be missed",
    )
    assert rules.slice_remarks(2.0, 2.5, 3.0) == (
        "thick slices (3.0 mm thick, over 2.5): small nodes may be missed",
    )
