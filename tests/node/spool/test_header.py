"""The header nodal reads before storing: raw values decoded as pydicom would decode them."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.spool.header import InvalidInstanceError, read_dataset_header, read_header
from tests.helpers.dicom import dataset_and_ts, enhanced_ct, in_syntax, part10


def both(data: bytes, ts: str = str(ExplicitVRLittleEndian)):
    """The header from the Part 10 file and from the dataset as a C-STORE carries it."""
    data = in_syntax(data, ts)
    dataset, found = dataset_and_ts(data)
    return read_header(data), read_dataset_header(dataset, found)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    "charset, description",
    [
        ("ISO_IR 100", "Thorax Übersicht"),
        ("ISO_IR 192", "Грудная клетка 胸部"),
        (["", "ISO 2022 IR 87"], "胸部"),  # code extensions after the default repertoire
        (None, "Thorax  axial"),
    ],
)
def test_series_description_decoded_in_its_character_set(ts, charset, description):
    extra = {"SpecificCharacterSet": charset} if charset else {}
    data = part10(SeriesDescription=description, **extra)
    expected = pydicom.dcmread(io.BytesIO(data)).SeriesDescription
    for header in both(data, str(ts)):
        assert header.series_description == expected == description


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    "charset, name, accession, patient_id",
    [
        ("ISO_IR 100", "Müller^Jürgen", "ACC-Ä1", "PID-ß7"),
        ("ISO_IR 192", "Иванов^Иван", "A1", "ИД-1"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "JP42", "P-1"),  # ideographic group
        (None, "Doe^Jane", "20261205001", "0042"),
    ],
)
def test_accession_number_and_patient_decoded_in_their_character_set(
    ts, charset, name, accession, patient_id
):
    extra = {"SpecificCharacterSet": charset} if charset else {}
    data = part10(PatientName=name, AccessionNumber=accession, PatientID=patient_id, **extra)
    ds = pydicom.dcmread(io.BytesIO(data))
    for h in both(data, str(ts)):
        assert (h.patient_name, h.accession_number, h.patient_id) == (
            str(ds.PatientName),
            ds.AccessionNumber,
            ds.PatientID,
        )
        assert (h.patient_name, h.accession_number, h.patient_id) == (name, accession, patient_id)


def test_without_accession_number_or_patient_they_are_empty():
    for h in both(part10()):
        assert (h.accession_number, h.patient_name, h.patient_id) == ("", "", "")


def test_values_as_pydicom_reads_them():
    data = part10(
        Modality="CT",
        ImageType=["derived", "SECONDARY ", "AXIAL"],
        SliceThickness="0.625 ",
        NumberOfFrames="1",
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    for h in both(data):
        assert h.image_type == tuple(v.strip().upper() for v in ds.ImageType)
        assert h.slice_thickness_mm == float(ds.SliceThickness) == 0.625
        assert (h.modality, h.frames) == ("CT", 1)


def test_an_integer_written_as_a_decimal_counts_frames():
    for h in both(part10(NumberOfFrames="3.0")):
        assert h.frames == 3


def written_as(data: bytes, valid: bytes, raw: bytes) -> bytes:
    """`data` with a valid value replaced by raw bytes of the same length (pydicom will not
    write an invalid one)."""
    assert data.count(valid) == 1 and len(raw) == len(valid)
    return data.replace(valid, raw)


@pytest.mark.parametrize("frames", [b"abc ", b"2.5 "])
def test_a_malformed_frame_count_is_refused_with_a_reason(frames):
    data = written_as(part10(NumberOfFrames="987"), b"987 ", frames)
    dataset, ts = dataset_and_ts(data)
    with pytest.raises(InvalidInstanceError, match="malformed header: ValueError"):
        read_dataset_header(dataset, ts)
    with pytest.raises(InvalidInstanceError, match="malformed header: ValueError"):
        read_header(data)


def test_a_thickness_that_is_no_number_is_left_out():
    for h in both(written_as(part10(SliceThickness="9.75"), b"9.75", b"thin")):
        assert h.slice_thickness_mm is None


def test_missing_optional_values_are_empty():
    data = part10()
    ds = pydicom.dcmread(io.BytesIO(data))
    for name in ("Modality", "ImageType", "SliceThickness", "SeriesDescription"):
        delattr(ds, name)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    for h in both(buf.getvalue()):
        assert (h.modality, h.image_type, h.slice_thickness_mm, h.series_description) == ("", (), None, "")
        assert h.sop_instance_uid == "1.2.3.4.5"


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_scan_of_a_reconstruction_read_from_the_header(ts):
    same = {"AcquisitionDate": "20260301", "AcquisitionTime": "101530"}
    data = part10(
        FrameOfReferenceUID="1.2.3.9",
        AcquisitionDate="20260301",
        AcquisitionTime="101530.25",
        ConvolutionKernel=["Br40d", "3"],
        ImagePositionPatient=["10", "20", "-300.5"],
        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
    )
    for h in both(data, str(ts)):
        assert h.frame_of_reference_uid == "1.2.3.9"
        assert h.acquired == (1772360130.25,) * 2  # 2026-03-01 10:15:30.25, read as UTC
        assert h.kernel == "Br40d\\3"
        assert h.extent_mm == (-300.5, -300.5)  # along the normal of an axial slice
    for when, expected in (
        (
            {"AcquisitionDateTime": "20260301101530.25", "AcquisitionTime": "235959"},
            1772360130.25,
        ),  # DT first
        ({"AcquisitionDateTime": "20260301101530.25+0100"}, 1772360130.25),  # the scanner's clock
        ({"AcquisitionDateTime": "2026030110xx", **same}, 1772360130.0),  # malformed: Date and Time
        ({"AcquisitionTime": "10:15:30"}, 10 * 3600 + 15 * 60 + 30),  # the form before 1993, no date
        ({"AcquisitionDateTime": "20260301", **same}, 1772360130.0),  # a date alone says no time
    ):
        assert [h.acquired for h in both(part10(**when))] == [(expected, expected)] * 2, when


def test_a_malformed_scan_attribute_reads_as_absent_and_the_instance_is_kept():
    data = part10(FrameOfReferenceUID="1.2.abc", AcquisitionTime="noon", ImagePositionPatient=["1", "2"])
    for h in both(data):
        assert (h.frame_of_reference_uid, h.acquired, h.kernel, h.extent_mm) == ("", None, "", None)
        assert h.sop_instance_uid == "1.2.3.4.5"


def test_a_slice_position_is_taken_along_the_normal_of_any_orientation():
    """Sagittal slices (rows along y, columns along -z: the normal along -x) lie where their
    position projects on that normal; a zero orientation says nothing."""
    sagittal = {
        "ImageOrientationPatient": ["0", "1", "0", "0", "0", "-1"],
        "ImagePositionPatient": ["12.5", "-30", "80"],
    }
    for h in both(part10(**sagittal)):
        assert h.extent_mm == (-12.5, -12.5)
    zero = {**sagittal, "ImageOrientationPatient": ["0", "0", "0", "0", "0", "0"]}
    assert [h.extent_mm for h in both(part10(**zero))] == [None, None]


@pytest.mark.parametrize(
    "ts",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
)
def test_an_enhanced_ct_says_its_kernel_thickness_and_the_span_of_its_frames(ts):
    data = enhanced_ct(
        [-100.0, -101.0, -102.5], FrameOfReferenceUID="1.2.3.9", AcquisitionDateTime="20260301101530"
    )
    for h in both(data, str(ts)):
        assert (h.frames, h.slice_thickness_mm, h.kernel) == (3, 1.0, "Br40d")
        assert h.extent_mm == (-102.5, -100.0)
        assert (h.frame_of_reference_uid, h.acquired) == ("1.2.3.9", (1772360130.0, 1772360130.0))
    for h in both(enhanced_ct([5.0, 7.0], kernel=None, orientation_per_frame=True), str(ts)):
        assert (h.kernel, h.extent_mm) == ("", (5.0, 7.0))
    times = ["20260301101529.5", "20260301101531.5", "20260301101530"]
    data = enhanced_ct([1.0, 2.0, 3.0], frame_times=times, AcquisitionDateTime="20260301101529")
    for h in both(data, str(ts)):
        assert h.acquired == (1772360129.5, 1772360131.5)  # the frames' span, not the start
    data = enhanced_ct(
        [1.0, 2.0], frame_times=["20260301101529.5", "noon"], AcquisitionDateTime="20260301101529"
    )
    for h in both(data, str(ts)):
        assert h.acquired == (1772360129.0, 1772360129.0)  # a frame that does not say: the start


def test_a_multi_frame_ct_says_in_its_first_frame_what_its_shared_groups_do_not():
    data = enhanced_ct([1.0, 2.0])
    ds = pydicom.dcmread(io.BytesIO(data))
    shared = ds.SharedFunctionalGroupsSequence[0]
    first = ds.PerFrameFunctionalGroupsSequence[0]
    first.PixelMeasuresSequence, first.CTReconstructionSequence = (
        shared.PixelMeasuresSequence,
        shared.CTReconstructionSequence,
    )
    first.PixelMeasuresSequence[0].SliceThickness = "0.75"
    del shared.PixelMeasuresSequence, shared.CTReconstructionSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    for h in both(buf.getvalue()):
        assert (h.slice_thickness_mm, h.kernel, h.extent_mm) == (0.75, "Br40d", (1.0, 2.0))


def test_a_multi_frame_instance_without_per_frame_groups_lies_at_its_one_position():
    data = enhanced_ct(
        [1.0, 2.0],
        ImagePositionPatient=["0", "0", "-4"],
        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
    )
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PerFrameFunctionalGroupsSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    for h in both(buf.getvalue()):
        assert (h.extent_mm, h.slice_thickness_mm) == ((-4.0, -4.0), 1.0)


def test_the_frames_of_a_multi_frame_instance_other_than_ct_are_not_read():
    """A SEG coming back from the PACS: its shared groups give the thickness; its frames'
    positions are not parsed on receipt."""
    for h in both(enhanced_ct([1.0, 2.0], modality="SEG")):
        assert (h.modality, h.slice_thickness_mm, h.extent_mm) == ("SEG", 1.0, None)


def test_an_enhanced_ct_with_a_frame_that_says_no_position_spans_nothing():
    data = enhanced_ct([1.0, 2.0])
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    for h in both(buf.getvalue()):
        assert (h.extent_mm, h.kernel, h.frames) == (None, "Br40d", 2)
