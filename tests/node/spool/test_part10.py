"""The C-STORE hot path's own encoders and readers, checked against pydicom's.

`file_meta_prefix` must give the very bytes pydicom's encoder gives for the same file meta
group, and `read_dataset_header` (the dataset as a C-STORE brings it) the same header as
`read_header` on the Part 10 file, in every transfer syntax family nodal accepts."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom_node.spool.header import InvalidInstanceError, read_dataset_header, read_header
from dicom_node.spool.part10 import file_meta_prefix
from tests.helpers.dicom import CT, dataset_and_ts, in_syntax, part10, pydicom_meta


@pytest.mark.parametrize(
    "sop, ts, ae",
    [
        ("1.2.3.4.5", ExplicitVRLittleEndian, "ORTHANC"),  # odd UID, odd AE: both padded
        ("1.2.3.4.56", ImplicitVRLittleEndian, "CT01"),  # even lengths
        ("1.2.826.0.1.3680043.8.498." + "1" * 38, JPEGBaseline8Bit, "SIXTEEN_CHARS_AE"),  # 64 characters
        ("1.2.3", DeflatedExplicitVRLittleEndian, ""),  # no caller: no (0002,0016)
    ],
)
def test_file_meta_prefix_is_what_pydicom_encodes(sop, ts, ae):
    assert file_meta_prefix(CT, sop, str(ts), ae) == pydicom_meta(CT, sop, str(ts), ae)


def test_file_meta_prefix_keeps_the_ae_title_valid():
    """Blanks around it go, a backslash or control character is dropped, 16 characters at most."""
    prefix = file_meta_prefix(CT, "1.2.3", str(ExplicitVRLittleEndian), " MOD\\AL\x07ITY_WITH_A_LONG_NAME ")
    meta = pydicom.dcmread(io.BytesIO(prefix + b"\x08\x00\x16\x00UI\x02\x001\x00"), force=True).file_meta
    assert meta.SourceApplicationEntityTitle == "MODALITY_WITH_A_"


@pytest.mark.parametrize(
    "ts",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
)
def test_dataset_header_equals_part10_header(ts):
    data = in_syntax(part10(Rows=2, Columns=2, BitsAllocated=16, PixelData=b"\0" * 8), str(ts))
    dataset, found_ts = dataset_and_ts(data)
    assert found_ts == ts
    expected = read_header(data)
    assert read_dataset_header(dataset, str(ts)) == expected
    assert read_dataset_header(dataset, str(ts), "CT01").source_ae == "CT01"


def test_dataset_header_of_enhanced_ct_reads_the_functional_groups():
    measures = Dataset()
    measures.SliceThickness = "1.25"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    data = part10(
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", NumberOfFrames=3, SharedFunctionalGroupsSequence=[shared]
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.SliceThickness
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dataset, ts = dataset_and_ts(buf.getvalue())
    h = read_dataset_header(dataset, ts)
    assert (h.frames, h.slice_thickness_mm) == (3, 1.25)


@pytest.mark.parametrize(
    "dataset, ts, why",
    [
        # a sequence item that claims more bytes than there are
        (
            b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00",
            str(ExplicitVRLittleEndian),
            "not a readable DICOM dataset",
        ),
        (b"", str(ExplicitVRLittleEndian), "SOP Class UID is missing"),
        (b"\x00" * 40, "1.2.3.4", "not a readable DICOM dataset"),  # not a transfer syntax
        (b"\x00" * 40, "", "Transfer Syntax UID is missing"),
    ],
)
def test_unreadable_datasets_are_refused_with_a_reason(dataset, ts, why):
    with pytest.raises(InvalidInstanceError, match=why):
        read_dataset_header(dataset, ts)
