"""Loading a CT series into a `Volume`: round trips through the writer, refusals, real data."""

from __future__ import annotations

import importlib.resources
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from inference.ct_series import PatientInfo, can_encode, write_ct_series
from inference.dicom_volume import (
    DuplicatePositionError,
    GantryTiltError,
    InconsistentGeometryError,
    IrregularSpacingError,
    MissingSlicesError,
    MixedOrientationError,
    MixedSeriesError,
    NotCTError,
    PixelDataError,
    TooFewSlicesError,
    UnreadableFileError,
    UnsupportedTransferSyntaxError,
    VolumeError,
    load_series,
)

SHAPE = (12, 32, 40)
# Patient data that must never show up in an error message.
PATIENT = PatientInfo(name="Secret^Person", id="SECRET-ID-42", birth_date="19510203", sex="F")
PHI = ("Secret", "Person", "SECRET-ID-42", "19510203")


def _affine(step, row_step, col_step, origin=(-15.0, -22.5, 40.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2], a[:3, 3] = step, row_step, col_step, origin
    return a


AXIAL = _affine((0, 0, 2.0), (0, 0.7, 0), (0.9, 0, 0))


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (f(np.radians(a)) for a in (ax, ay, az) for f in (np.cos, np.sin))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _hu(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2500, size=shape).astype(np.float32)


def _write(tmp_path: Path, arr=None, affine=AXIAL, name: str = "s", **kw) -> list[Path]:
    kw.setdefault("patient", PATIENT)
    return write_ct_series(_hu() if arr is None else arr, affine, tmp_path / name, **kw)


def _edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _refused(error: type[VolumeError], sources, *words: str, **kw) -> str:
    with pytest.raises(error) as info:
        load_series(sources, **kw)
    message = str(info.value)
    for word in words:
        assert word in message
    assert not any(p in message for p in PHI), message
    return message


def _assert_volume(vol, arr: np.ndarray, affine: np.ndarray) -> None:
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, arr, atol=1e-4)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)


# --- round trips ---------------------------------------------------------------------------


def test_axial_round_trip_from_directory(tmp_path: Path) -> None:
    arr = _hu()
    paths = _write(tmp_path, arr)
    vol = load_series(tmp_path / "s")
    _assert_volume(vol, arr, AXIAL)
    assert vol.shape == SHAPE
    assert vol.spacing == pytest.approx((2.0, 0.7, 0.9))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert vol.series_instance_uid == first.SeriesInstanceUID
    assert vol.study_instance_uid == first.StudyInstanceUID
    assert vol.frame_of_reference_uid == first.FrameOfReferenceUID
    assert [s.sop_instance_uid for s in vol.slices] == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths
    ]
    assert {(s.sop_class_uid, s.frame_number) for s in vol.slices} == {("1.2.840.10008.5.1.4.1.1.2", None)}


def test_paths_datasets_and_non_dicom_files(tmp_path: Path) -> None:
    arr = _hu()
    paths = _write(tmp_path, arr)
    (tmp_path / "s" / "README.txt").write_text("not DICOM")
    _assert_volume(load_series(tmp_path / "s"), arr, AXIAL)  # the text file is skipped
    _assert_volume(load_series([str(p) for p in reversed(paths)]), arr, AXIAL)
    datasets = [pydicom.dcmread(p) for p in paths]
    _assert_volume(load_series(datasets), arr, AXIAL)
    for ds in datasets:  # datasets built in memory have no file meta
        del ds.file_meta
    _assert_volume(load_series(datasets), arr, AXIAL)
    _refused(UnreadableFileError, [*paths, tmp_path / "s" / "README.txt"], "input #12")


def test_oblique_orientation_round_trip(tmp_path: Path) -> None:
    r = _rotation(20, -35, 50)
    affine = _affine(2.5 * r[:, 2], 0.8 * r[:, 1], 0.6 * r[:, 0])
    arr = _hu()
    _write(tmp_path, arr, affine)
    vol = load_series(tmp_path / "s")
    _assert_volume(vol, arr, affine)


def test_non_square_pixels_put_row_spacing_on_the_row_axis(tmp_path: Path) -> None:
    arr = _hu()
    paths = _write(tmp_path, arr)
    ds = pydicom.dcmread(paths[0])
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.9]
    vol = load_series(tmp_path / "s")
    # j (rows) runs along IOP[3:6] = +y with 0.7 mm; i (columns) along IOP[0:3] = +x, 0.9 mm
    np.testing.assert_allclose(vol.affine[:3, 1], [0, 0.7, 0], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.9, 0, 0], atol=1e-6)
    assert vol.array.shape[1:] == (ds.Rows, ds.Columns) == (32, 40)
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array.astype(np.float32) - 1024)


def test_reversed_slice_order_and_shuffled_instance_numbers(tmp_path: Path) -> None:
    arr = _hu()
    affine = _affine((0, 0, -2.0), (0, 0.7, 0), (0.9, 0, 0))  # slice axis against the normal
    paths = _write(tmp_path, arr, affine)
    for path, number in zip(paths, np.random.default_rng(1).permutation(len(paths)), strict=True):
        _edit(path, InstanceNumber=int(number) + 1)
    vol = load_series(tmp_path / "s")
    expected = affine.copy()
    expected[:3, 0] *= -1
    expected[:3, 3] = affine[:3, 3] + (len(paths) - 1) * affine[:3, 0]
    _assert_volume(vol, arr[::-1], expected)  # sorted along the normal: bottom slice first
    assert vol.slices[0].sop_instance_uid == pydicom.dcmread(paths[-1]).SOPInstanceUID


def test_enhanced_ct_round_trip(tmp_path: Path) -> None:
    arr = _hu()
    r = _rotation(0, 10, 0)
    affine = _affine(-2.0 * r[:, 2], 0.7 * r[:, 1], 0.9 * r[:, 0])
    paths = _write(tmp_path, arr, affine, enhanced=True)
    vol = load_series(paths)
    expected = affine.copy()
    expected[:3, 0] *= -1
    expected[:3, 3] = affine[:3, 3] + (SHAPE[0] - 1) * affine[:3, 0]
    _assert_volume(vol, arr[::-1], expected)
    assert [s.frame_number for s in vol.slices] == list(range(SHAPE[0], 0, -1))
    assert vol.slices[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.mark.parametrize("enhanced", [False, True])
def test_slice_thickness_is_read_and_an_unusable_one_is_unknown(tmp_path: Path, enhanced: bool) -> None:
    """Slice Thickness (from the functional groups of an Enhanced CT) informs the results'
    remarks only: absent, empty or zero it is unknown, never an error."""
    assert load_series(_write(tmp_path, enhanced=enhanced)).slice_thickness_mm == 2.0  # as far apart
    paths = _write(tmp_path, name="thick", slice_thickness=5.0, enhanced=enhanced)
    assert load_series(paths).slice_thickness_mm == 5.0
    if not enhanced:
        for value in ("", "0", None):
            paths = _write(tmp_path, name=f"t{value}", slice_thickness=5.0)
            for p in paths:
                _edit(p, SliceThickness=value)
            assert load_series(paths).slice_thickness_mm is None


def test_enhanced_ct_per_frame_rescale(tmp_path: Path) -> None:
    arr = _hu()
    (path,) = _write(tmp_path, arr, enhanced=True)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PixelValueTransformationSequence = pydicom.sequence.Sequence([Dataset()])
        own = item.PixelValueTransformationSequence[0]
        own.update(transform[0])
        own.RescaleIntercept = str(-1024 + 10 * k)
    ds.save_as(path)
    vol = load_series([path])
    np.testing.assert_allclose(vol.array, arr + 10 * np.arange(SHAPE[0])[:, None, None])


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
@pytest.mark.parametrize("enhanced", [False, True])
def test_compressed_round_trip(tmp_path: Path, ts: str, enhanced: bool) -> None:
    if not can_encode(ts):
        pytest.skip(f"no encoder installed for {ts}")
    arr = _hu()
    paths = _write(tmp_path, arr, transfer_syntax=ts, enhanced=enhanced)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    _assert_volume(load_series(paths), arr, AXIAL)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    arr = np.round(_hu() * 2) / 2  # half-HU steps need slope 0.5
    paths = _write(tmp_path, arr, rescale_slope=0.5, rescale_intercept=-1000.0)
    ds = pydicom.dcmread(paths[3])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, -1000.0)
    _assert_volume(load_series(paths), arr, AXIAL)
    ds.RescaleIntercept = "-990"  # rescale is per slice
    ds.save_as(paths[3])
    vol = load_series(paths)
    np.testing.assert_allclose(vol.array[3], arr[3] + 10)
    np.testing.assert_allclose(vol.array[4], arr[4])


def test_affine_maps_voxels_to_the_dicom_geometry(tmp_path: Path) -> None:
    r = _rotation(15, 5, -25)
    paths = _write(tmp_path, None, _affine(1.5 * r[:, 2], 0.7 * r[:, 1], 0.9 * r[:, 0]))
    vol = load_series(paths)
    headers = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in paths)}
    for k, j, i in [(0, 0, 0), (3, 5, 7), (11, 31, 39), (6, 31, 0)]:
        ds = headers[vol.slices[k].sop_instance_uid]
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        expected = (
            np.array([float(v) for v in ds.ImagePositionPatient])
            + j * row_spacing * iop[3:]
            + i * col_spacing * iop[:3]
        )
        np.testing.assert_allclose(vol.to_lps([k, j, i]), expected, atol=1e-4)


def test_small_tilt_within_the_limit_loads_with_the_true_step(tmp_path: Path) -> None:
    tilt = np.radians(1.0)
    affine = _affine((0, 2 * np.sin(tilt), 2 * np.cos(tilt)), (0, 0.7, 0), (0.9, 0, 0))
    arr = _hu()
    _write(tmp_path, arr, affine)
    _assert_volume(load_series(tmp_path / "s"), arr, affine)


def test_real_ct_slice_from_pydicom(tmp_path: Path) -> None:
    path = importlib.resources.files("pydicom") / "data" / "test_files" / "CT_small.dcm"
    if not path.is_file():
        pytest.skip("pydicom's bundled CT_small.dcm is not installed")
    source = pydicom.dcmread(path)
    iop = np.array([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array([float(v) for v in source.ImagePositionPatient])
    files = []
    for k in (4, 0, 7, 2, 1, 6, 3, 5):  # written out of order
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp0 + 3.0 * k * normal]
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ct-small", str(k)])
        ds.InstanceNumber = 100 - k
        ds.PixelData = (ds.pixel_array + 5 * k).astype(ds.pixel_array.dtype).tobytes()
        files.append(tmp_path / f"{k}.dcm")
        ds.save_as(files[-1])
    vol = load_series(files)
    slope, intercept = float(source.RescaleSlope), float(source.RescaleIntercept)
    expected = source.pixel_array.astype(np.float64) * slope + intercept
    for k in range(8):
        np.testing.assert_allclose(vol.array[k], expected + 5 * k * slope, atol=1e-3)
    spacing = [float(v) for v in source.PixelSpacing]
    np.testing.assert_allclose(vol.affine[:3, 0], 3.0 * normal, atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 1], iop[3:] * spacing[0], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], iop[:3] * spacing[1], atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 3], ipp0, atol=1e-4)
    with pytest.raises(TooFewSlicesError) as info:  # one real slice alone is not a volume
        load_series(path)
    assert str(source.PatientName) not in str(info.value)
    assert source.PatientID not in str(info.value)


def test_memory_stays_near_one_volume(tmp_path: Path) -> None:
    shape = (40, 128, 128)
    paths = write_ct_series(np.zeros(shape, np.float32), AXIAL, tmp_path)
    volume_bytes = np.prod(shape) * 4
    tracemalloc.start()
    try:
        vol = load_series(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.shape == shape
    assert peak < 1.5 * volume_bytes, f"peak {peak / volume_bytes:.2f} volumes"


# --- refusals --------------------------------------------------------------------------------


def test_missing_slice(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    paths.pop(6).unlink()
    _refused(
        MissingSlicesError, tmp_path / "s",
        "gap of 4.0 mm between slice 5 and 6", "median spacing 2.0 mm",
    )  # fmt: skip


def test_duplicate_position(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    ipp = pydicom.dcmread(paths[4]).ImagePositionPatient
    _edit(paths[5], ImagePositionPatient=ipp)
    _refused(DuplicatePositionError, paths, "same position", "two acquisitions")
    _refused(DuplicatePositionError, [*paths, paths[0]], "given twice")


def test_gantry_tilt(tmp_path: Path) -> None:
    tilt = np.radians(10.0)
    affine = _affine((0, 2 * np.sin(tilt), 2 * np.cos(tilt)), (0, 0.7, 0), (0.9, 0, 0))
    _write(tmp_path, affine=affine)
    _refused(GantryTiltError, tmp_path / "s", "tilt", "10.0 degrees")
    assert load_series(tmp_path / "s", max_tilt_degrees=11).shape == SHAPE


def test_mixed_orientation(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    r = _rotation(0, 0, 5)
    _edit(paths[3], ImageOrientationPatient=[f"{v:.6f}" for v in (*r[:, 0], *r[:, 1])])
    _refused(MixedOrientationError, paths, "ImageOrientationPatient")


def test_too_few_slices(tmp_path: Path) -> None:
    paths = _write(tmp_path, _hu((5, 32, 40)))
    _refused(TooFewSlicesError, paths, "5 slice(s)", "at least 8")
    assert load_series(paths, min_slices=5).shape == (5, 32, 40)
    _refused(TooFewSlicesError, paths[:1], "at least 2", min_slices=1)
    (tmp_path / "empty").mkdir()
    _refused(TooFewSlicesError, tmp_path / "empty", "no DICOM")


def test_not_ct(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[2], Modality="MR")
    _refused(NotCTError, paths, "Modality 'MR'", "CT")
    _edit(paths[2], Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")  # secondary capture
    _refused(NotCTError, paths, "1.2.840.10008.5.1.4.1.1.7")


def test_two_series_mixed(tmp_path: Path) -> None:
    _write(tmp_path, name="root/a", uid_seed="first")
    _write(tmp_path, name="root/b", uid_seed="second")
    _refused(MixedSeriesError, tmp_path / "root", "2 different series", "one series")


def test_missing_pixel_data(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[7], PixelData=None)
    _refused(PixelDataError, paths, "no pixel data")
    datasets = [pydicom.dcmread(p) for p in paths]
    _refused(PixelDataError, datasets, "no pixel data")


def test_damaged_pixel_data(tmp_path: Path) -> None:
    paths = _write(tmp_path, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = ds.PixelData[:40]
    ds.save_as(paths[2])
    _refused(PixelDataError, paths, "could not be decoded")


def test_undecodable_transfer_syntax(tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in _write(tmp_path)]
    datasets[0].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    _refused(UnsupportedTransferSyntaxError, datasets, "1.2.840.10008.1.2.4.100")


def test_differing_size_or_pixel_spacing(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[1], PixelSpacing=["0.8", "0.9"])
    _refused(InconsistentGeometryError, paths, "PixelSpacing")
    paths = _write(tmp_path, name="t")
    small = _write(tmp_path, _hu((12, 16, 40)), name="u")
    _refused(InconsistentGeometryError, [*paths[:6], *small[6:]], "different sizes")


def test_irregular_spacing(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    ipp = [float(v) for v in pydicom.dcmread(paths[5]).ImagePositionPatient]
    _edit(paths[5], ImagePositionPatient=[f"{v:g}" for v in (ipp[0], ipp[1], ipp[2] + 0.6)])
    _refused(IrregularSpacingError, paths, "slice 5", "evenly spaced")
