"""The synthetic CT writer: valid CT Image / Enhanced CT files, geometry from the affine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from inference.ct_series import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    EncoderUnavailableError,
    PatientInfo,
    can_encode,
    write_ct_series,
)


def _affine(step=(0.0, 0.0, 2.0), row_step=(0.0, 0.7, 0.0), col_step=(0.9, 0.0, 0.0)):
    """(k, j, i) -> LPS with the given slice, row (j) and column (i) steps."""
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = step, row_step, col_step
    a[:3, 3] = (-12.0, -20.0, 35.0)
    return a


def _array(shape=(4, 6, 5)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 50


def test_single_frame_files_hold_the_required_attributes(tmp_path: Path) -> None:
    paths = write_ct_series(_array(), _affine(), tmp_path)
    assert [p.name for p in paths] == [f"CT{k:05d}.dcm" for k in range(1, 5)]
    ds = pydicom.dcmread(paths[1])
    assert ds.SOPClassUID == CT_IMAGE_STORAGE
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    required = [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
        "AccessionNumber", "Modality", "SeriesInstanceUID", "SeriesNumber", "PatientPosition",
        "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "InstanceNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept",
        "RescaleSlope", "WindowCenter", "WindowWidth", "ImageType", "KVP",
        "AcquisitionNumber", "SOPInstanceUID", "PixelData",
    ]  # fmt: skip
    assert [kw for kw in required if kw not in ds] == []
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.Modality == "CT" and ds.InstanceNumber == 2
    assert (ds.Rows, ds.Columns, ds.PixelRepresentation, ds.BitsAllocated) == (6, 5, 1, 16)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SpecificCharacterSet" not in ds


def test_geometry_is_derived_from_the_affine(tmp_path: Path) -> None:
    paths = write_ct_series(_array(), _affine(), tmp_path)
    ds = pydicom.dcmread(paths[2])
    assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.9]  # (between rows, between columns)
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], (-12.0, -20.0, 39.0))
    assert float(ds.SliceLocation) == pytest.approx(39.0)
    assert float(ds.SliceThickness) == pytest.approx(2.0)
    np.testing.assert_array_equal(ds.pixel_array, _array()[2] + 1024)


def test_oblique_affine_writes_the_rotated_orientation(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    row_cos, col_cos = np.array([c, s, 0.0]), np.array([0.0, 0.0, -1.0])  # coronal-ish, tilted
    normal = np.cross(row_cos, col_cos)
    affine = _affine(step=-3 * normal, row_step=0.8 * col_cos, col_step=0.6 * row_cos)
    paths = write_ct_series(_array(), affine, tmp_path, slice_thickness=2.5)
    ds = pydicom.dcmread(paths[3])
    assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [*row_cos, *col_cos])
    assert np.allclose([float(v) for v in ds.PixelSpacing], [0.8, 0.6])
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], affine[:3, 3] - 9 * normal)
    assert float(ds.SliceThickness) == 2.5


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path) -> None:
    a = write_ct_series(_array(), _affine(), tmp_path / "a", uid_seed="s1")
    b = write_ct_series(_array(), _affine(), tmp_path / "b", uid_seed="s1")
    c = write_ct_series(_array(), _affine(), tmp_path / "c", uid_seed="s2")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    da, dc = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert da[kw].value != dc[kw].value
        assert da[kw].value.startswith("2.25.")
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in a}) == len(a)


def test_given_uids_and_patient_are_used(tmp_path: Path) -> None:
    patient = PatientInfo(name="Müller^Jörg", id="P-1", birth_date="19700101", sex="M")
    paths = write_ct_series(
        _array(), _affine(), tmp_path, patient=patient,
        study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.5", series_description="x",
    )  # fmt: skip
    ds = pydicom.dcmread(paths[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jörg"
    assert (ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == ("P-1", "19700101", "M")
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
    assert ds.SeriesDescription == "x"


def test_enhanced_ct_is_one_multiframe_file(tmp_path: Path) -> None:
    paths = write_ct_series(_array(), _affine(), tmp_path, enhanced=True)
    assert len(paths) == 1
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
    assert ds.NumberOfFrames == 4 and len(ds.PerFrameFunctionalGroupsSequence) == 4
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.7, 0.9]
    ipp = ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0].ImagePositionPatient
    assert np.allclose([float(v) for v in ipp], (-12.0, -20.0, 41.0))
    assert float(shared.PixelValueTransformationSequence[0].RescaleIntercept) == -1024
    np.testing.assert_array_equal(ds.pixel_array, _array() + 1024)


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("enhanced", [False, True])
def test_compressed_writes_decode_losslessly(tmp_path: Path, ts: str, enhanced: bool) -> None:
    if not can_encode(ts):
        pytest.skip(f"no encoder for {ts}")
    arr = _array((3, 32, 40)) * 7  # JPEG 2000 needs >= 32x32; stored values span +/-
    paths = write_ct_series(arr, _affine(), tmp_path, transfer_syntax=ts, enhanced=enhanced)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ts
    expected = arr + 1024 if enhanced else arr[0] + 1024
    np.testing.assert_array_equal(ds.pixel_array, expected)


def test_refuses_what_dicom_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="orthogonal"):
        write_ct_series(_array(), _affine(row_step=(0.5, 0.7, 0.0)), tmp_path)
    with pytest.raises(ValueError, match="16-bit"):
        write_ct_series(_array() + 40000, _affine(), tmp_path)
    with pytest.raises(ValueError, match="3D"):
        write_ct_series(np.zeros((4, 4)), _affine(), tmp_path)
    with pytest.raises(ValueError, match="32x32"):
        write_ct_series(_array(), _affine(), tmp_path, transfer_syntax=JPEG2000Lossless)
    with pytest.raises(EncoderUnavailableError, match=r"1\.2\.3\.4"):
        write_ct_series(_array(), _affine(), tmp_path, transfer_syntax="1.2.3.4")


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("enhanced", [False, True])
def test_dciodvfy_finds_no_errors(tmp_path: Path, enhanced: bool) -> None:
    paths = write_ct_series(_array(), _affine(), tmp_path, enhanced=enhanced)
    result = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True)
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
    ]  # fmt: skip
    assert problems == []
