"""Write a NumPy HU volume as a DICOM CT series (the inverse of `inference.dicom_volume`).

Used by the phantom generator and by tests. `write_ct_series` writes one CT Image Storage
file per slice, or one Enhanced CT Image Storage multi-frame file, with the geometry taken
from the affine: for an affine whose columns are (slice step, row step, column step) the
writer puts IOP = (column step / |column step|, row step / |row step|), PixelSpacing =
(|row step|, |column step|) and IPP of slice k = origin + k * slice step. Oblique planes, a
slice axis pointing against the slice normal and a sheared (tilted) slice step are written
as given.

UIDs are derived from `uid_seed`, dates and times are fixed, so the same call writes the
same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pydicom.valuerep import format_number_as_ds

from inference.uids import deterministic_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "EncoderUnavailableError",
    "PatientInfo",
    "can_encode",
    "write_ct_series",
]

CT_IMAGE_STORAGE = str(CTImageStorage)
ENHANCED_CT_IMAGE_STORAGE = str(EnhancedCTImageStorage)
_JPEG2000 = {JPEG2000Lossless, JPEG2000}
_NATIVE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}

# Fixed so that a seed reproduces the same files byte for byte.
_DATE = "20240101"
_TIME = "120000"
_MANUFACTURER = "nodal"
_MODEL_NAME = "nodal synthetic CT"
_SOFTWARE_VERSION = "nodal ct_series 1"


class EncoderUnavailableError(RuntimeError):
    """No installed pixel data encoder can write the requested transfer syntax."""


@dataclass(frozen=True)
class PatientInfo:
    """Patient module values; the defaults describe a synthetic phantom, not a person."""

    name: str = "Phantom^Nodal"
    id: str = "NODAL-PHANTOM"
    birth_date: str = ""  # YYYYMMDD or empty
    sex: str = "O"  # M, F, O or empty


def can_encode(transfer_syntax: str) -> bool:
    """Whether `write_ct_series` can write `transfer_syntax` with the installed plugins."""
    uid = UID(transfer_syntax)
    if uid in _NATIVE:
        return True
    try:
        return bool(get_encoder(uid).is_available)
    except NotImplementedError:
        return False


def write_ct_series(
    array_hu: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    patient: PatientInfo | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    uid_seed: str = "nodal-synthetic-ct",
    enhanced: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_description: str = "nodal synthetic CT",
    slice_thickness: float | None = None,
    series_number: int = 1,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
) -> list[Path]:
    """Write `array_hu` (K, J, I) as a CT series in `out_dir`; return the files written.

    JPEG 2000 needs images of at least 32x32 pixels (the encoder's 6 wavelet levels).
    Stored values are ``round((HU - rescale_intercept) / rescale_slope)`` as signed 16-bit.
    Single-frame files are named ``CT00001.dcm``... in k order with InstanceNumber k + 1;
    the Enhanced CT file is ``CT_enhanced.dcm`` with frame k + 1 holding slice k.

    Raises
    ------
    ValueError
        The array is not 3D, the affine is not a valid 4x4 with orthogonal in-plane axes,
        or the HU values do not fit signed 16-bit with the given rescale.
    EncoderUnavailableError
        `transfer_syntax` is compressed and no installed encoder can write it.
    """
    array_hu = np.asarray(array_hu)
    if array_hu.ndim != 3 or min(array_hu.shape) < 1:
        raise ValueError(f"array_hu must be a non-empty 3D (k, j, i) array, got {array_hu.shape}")
    if not rescale_slope > 0:
        raise ValueError(f"rescale_slope must be positive, got {rescale_slope}")
    tsyntax = UID(transfer_syntax)
    if not can_encode(tsyntax):
        raise EncoderUnavailableError(
            f"cannot write transfer syntax {tsyntax} ({tsyntax.name}): no encoder installed; "
            "use Explicit VR Little Endian or RLE Lossless"
        )
    if tsyntax in _JPEG2000 and min(array_hu.shape[1:]) < 32:
        raise ValueError("the JPEG 2000 encoder (6 wavelet levels) needs images of at least 32x32 pixels")
    geometry = _Geometry.from_affine(affine)
    stored = _to_stored(array_hu, rescale_slope, rescale_intercept)

    patient = patient or PatientInfo()
    study_uid = study_instance_uid or _uid(uid_seed, "study")
    series_uid = series_instance_uid or _uid(uid_seed, "series", study_uid)
    frame_of_reference_uid = _uid(uid_seed, "frame-of-reference", study_uid)
    thickness = slice_thickness if slice_thickness is not None else geometry.slice_spacing

    base = _base_dataset(
        patient, study_uid, series_uid, frame_of_reference_uid, series_description, series_number
    )
    base.Rows, base.Columns = int(stored.shape[1]), int(stored.shape[2])
    base.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    base.SliceThickness = _ds(thickness)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if enhanced:
        uid = _uid(uid_seed, "instance", series_uid, "enhanced")
        ds = _enhanced(base, uid, geometry, stored, rescale_slope, rescale_intercept, uid_seed)
        path = out_dir / "CT_enhanced.dcm"
        _save(ds, stored, tsyntax, path)
        return [path]

    paths = []
    for k in range(stored.shape[0]):
        ds = _single_frame(base, geometry, k, rescale_slope, rescale_intercept)
        ds.SOPInstanceUID = _uid(uid_seed, "instance", series_uid, str(k))
        path = out_dir / f"CT{k + 1:05d}.dcm"
        _save(ds, stored[k], tsyntax, path)
        paths.append(path)
    return paths


# --- geometry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    origin: np.ndarray
    step: np.ndarray  # slice k -> k + 1
    row_cos: np.ndarray  # IOP[0:3], direction of increasing column index i
    col_cos: np.ndarray  # IOP[3:6], direction of increasing row index j
    pixel_spacing: tuple[float, float]  # (between rows, between columns)

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> _Geometry:
        a = np.asarray(affine, dtype=float)
        if a.shape != (4, 4) or not np.allclose(a[3], (0, 0, 0, 1)) or not np.isfinite(a).all():
            raise ValueError("affine must be a finite 4x4 matrix with last row (0, 0, 0, 1)")
        row_spacing, col_spacing = np.linalg.norm(a[:3, 1]), np.linalg.norm(a[:3, 2])
        if min(row_spacing, col_spacing) <= 0:
            raise ValueError("affine has a zero row or column step")
        col_cos, row_cos = a[:3, 1] / row_spacing, a[:3, 2] / col_spacing
        if abs(float(row_cos @ col_cos)) > 1e-6:
            raise ValueError(
                "affine columns 1 and 2 (row and column steps) must be orthogonal: DICOM "
                "Image Orientation (Patient) cannot express sheared pixels"
            )
        geometry = cls(a[:3, 3], a[:3, 0], row_cos, col_cos, (float(row_spacing), float(col_spacing)))
        if geometry.slice_spacing < 1e-6:
            raise ValueError("affine column 0 (slice step) lies in the image plane")
        return geometry

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    @property
    def slice_spacing(self) -> float:
        return abs(float(self.step @ self.normal))

    @property
    def iop(self) -> list[str]:
        return [_ds(v) for v in (*self.row_cos, *self.col_cos)]

    def ipp(self, k: int) -> np.ndarray:
        return self.origin + k * self.step


def _ds(value: float) -> str:
    """A DS string of at most 16 characters, and no '-0'."""
    text = format_number_as_ds(float(value) + 0.0)
    return "0" if float(text) == 0 else text


# --- datasets --------------------------------------------------------------------------------


def _uid(seed: str, *parts: str) -> str:
    return deterministic_uid(seed, *parts)


def _to_stored(array_hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    values = (np.asarray(array_hu, dtype=np.float64) - intercept) / slope
    if not np.isfinite(values).all():
        raise ValueError("array_hu holds NaN or infinite values")
    values = np.rint(values)
    low, high = float(values.min()), float(values.max())
    if low < -32768 or high > 32767:
        raise ValueError(
            f"HU values map to stored values {low:.0f}..{high:.0f} with slope {slope} and "
            f"intercept {intercept}, outside signed 16-bit; clip the array or change the rescale"
        )
    return values.astype(np.int16)


def _base_dataset(
    patient: PatientInfo,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_description: str,
    series_number: int,
) -> Dataset:
    """Attributes shared by every instance: patient, study, series, equipment, pixel format."""
    ds = Dataset()
    if not all(text.isascii() for text in (*vars(patient).values(), series_description)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _DATE
    ds.StudyTime = _TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "nodal synthetic study"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = _DATE
    ds.SeriesTime = _TIME
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = _MODEL_NAME
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = _SOFTWARE_VERSION
    # General Image / acquisition
    ds.ContentDate = _DATE
    ds.ContentTime = _TIME
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _single_frame(base: Dataset, geometry: _Geometry, k: int, slope: float, intercept: float) -> Dataset:
    ds = Dataset()
    ds.update(base)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.AcquisitionDate = _DATE
    ds.AcquisitionTime = _TIME
    ipp = geometry.ipp(k)
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = geometry.iop
    ds.SliceLocation = _ds(float(ipp @ geometry.normal))
    # CT Image
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced(
    base: Dataset,
    sop_instance_uid: str,
    geometry: _Geometry,
    stored: np.ndarray,
    slope: float,
    intercept: float,
    uid_seed: str,
) -> Dataset:
    """The Enhanced CT Image dataset (without pixel data) for all K frames."""
    ds = Dataset()
    ds.update(base)
    spacing = base.PixelSpacing
    thickness = base.SliceThickness
    del ds.PixelSpacing, ds.SliceThickness, ds.AcquisitionNumber
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = 1
    ds.NumberOfFrames = int(stored.shape[0])
    # Enhanced CT Image: a synthetic volume is DERIVED, which keeps the ORIGINAL-only
    # acquisition macros out.
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    # Multi-frame Dimension: one stack, frames indexed by their position in it.
    dimension_uid = _uid(uid_seed, "dimension-organization", sop_instance_uid)
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,  # Stack ID
                FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,  # In-Stack Position Number
                FunctionalGroupPointer=0x00209111,
                DimensionDescriptionLabel="In-Stack Position Number",
            ),
        ]
    )
    # Functional groups shared by all frames.
    shared = _item(
        PixelMeasuresSequence=DicomSequence([_item(PixelSpacing=spacing, SliceThickness=thickness)]),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=geometry.iop)]),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleIntercept=_ds(intercept), RescaleSlope=_ds(slope), RescaleType="HU")]
        ),
        FrameVOILUTSequence=DicomSequence([_item(WindowCenter="40", WindowWidth="400")]),
        CTImageFrameTypeSequence=DicomSequence(
            [
                _item(
                    FrameType=["DERIVED", "PRIMARY", "VOLUME", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ]
        ),
        FrameAnatomySequence=DicomSequence(
            [
                _item(
                    AnatomicRegionSequence=DicomSequence([_code("38266002", "SCT", "Entire body")]),
                    FrameLaterality="U",
                )
            ]
        ),
        IrradiationEventIdentificationSequence=DicomSequence(
            [_item(IrradiationEventUID=_uid(uid_seed, "irradiation-event", sop_instance_uid))]
        ),
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                FrameContentSequence=DicomSequence(
                    [
                        _item(
                            StackID="1",
                            InStackPositionNumber=k + 1,
                            DimensionIndexValues=[1, k + 1],
                        )
                    ]
                ),
                PlanePositionSequence=DicomSequence(
                    [_item(ImagePositionPatient=[_ds(v) for v in geometry.ipp(k)])]
                ),
            )
            for k in range(stored.shape[0])
        ]
    )
    return ds


def _save(ds: Dataset, stored: np.ndarray, tsyntax: UID, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if tsyntax in _NATIVE:
        ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = tsyntax
    else:
        ds.compress(tsyntax, np.ascontiguousarray(stored), generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
