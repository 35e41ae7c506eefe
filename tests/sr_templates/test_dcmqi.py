"""dcmqi (QIICR's DICOM for quantitative imaging, PyPI `dcmqi`) reads nodal's SEG and SR.

`segimage2itkimage --mergeSegments` makes one label image of a SEG whose segments do not
overlap; `tid1500reader` turns the TID 1500 SR into its JSON description.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sr_templates import write_results
from tests.helpers.sr_case import make_case

BIN = Path(sys.executable).parent
SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage", path=str(BIN)) or shutil.which("segimage2itkimage")
TID1500READER = shutil.which("tid1500reader", path=str(BIN)) or shutil.which("tid1500reader")
pytestmark = pytest.mark.skipif(
    SEGIMAGE2ITKIMAGE is None or TID1500READER is None,
    reason="dcmqi not installed (`pip install -e '.[dev]'` brings it on Linux x86_64)",
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("dcmqi"))
    write_results(case.datasets, case.findings, case.folder / "out", result_images=False)
    return case


def _run(*args: str) -> str:
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def test_segimage2itkimage_gives_every_node_its_voxels_in_one_label_image(case) -> None:
    out = case.folder / "dcmqi-seg"
    out.mkdir()
    log = _run(
        SEGIMAGE2ITKIMAGE,
        "--inputDICOM",
        str(case.folder / "out" / "seg.dcm"),
        "--outputDirectory",
        str(out),
        "--outputType",
        "nifti",
        "--mergeSegments",
    )
    assert "warn" not in log.lower(), log
    (label_file,) = out.glob("*.nii*")  # one file: the segments do not overlap
    labels = np.asarray(nib.load(str(label_file)).dataobj)
    for number, finding in enumerate(case.findings.findings, start=1):
        assert int((labels == number).sum()) == int(finding.mask.sum()), finding.label
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ContentCreatorName"]
    described = [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group]
    assert described == [f.label for f in case.findings.findings]


def test_tid1500reader_reads_both_groups_of_every_node(case) -> None:
    out = case.folder / "sr.json"
    _run(TID1500READER, "--inputDICOM", str(case.folder / "out" / "sr.dcm"), "--outputMetadata", str(out))
    groups = json.loads(out.read_text())["Measurements"]
    findings = case.findings.findings
    assert len(groups) == 2 * len(findings)
    for finding in findings:
        mine = [g for g in groups if g["TrackingUniqueIdentifier"] == finding.tracking_uid]
        assert len(mine) == 2 and {g["TrackingIdentifier"] for g in mine} == {finding.label}
        values = {
            item["quantity"]["CodeValue"]: (float(item["value"]), item["units"]["CodeValue"])
            for g in mine
            for item in g["measurementItems"]
        }
        assert values["103339001"] == (pytest.approx(finding.long_axis.length_mm), "mm")
        assert values["103340004"] == (pytest.approx(finding.short_axis.length_mm), "mm")
        assert values["118565006"] == (pytest.approx(finding.volume_mm3), "mm3")
        assert values["111047"] == (pytest.approx(100 * finding.malignancy_probability), "%")
        segment = [g for g in mine if "ReferencedSegment" in g]
        assert len(segment) == 1 and segment[0]["ReferencedSegment"] == findings.index(finding) + 1
