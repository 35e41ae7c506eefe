"""Load one DICOM CT series into a `Volume` in patient space.

`load_series` accepts file paths, a directory or pydicom datasets of one series, sorts the
slices along the slice normal (never by Instance Number), checks that they form a regular
3D grid, applies the modality rescale and returns HU as float32 with an LPS affine.

Both single-frame CT Image Storage and multi-frame Enhanced CT (and Legacy Converted
Enhanced CT) are read. Compressed transfer syntaxes are decoded by pydicom's pixel
handlers with whatever plugins are installed (pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls).

When given paths, only the headers are read first (`stop_before_pixels`); pixel data is
then decoded one file (one frame) at a time into a preallocated float32 array, so loading
holds little more than the volume itself.

Error messages never contain patient data: they name slices by their sorted index or by
their position in the input, never by file name or patient attribute.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
)

from inference.findings import SliceRef
from inference.volume import Volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE",
    "DuplicatePositionError",
    "GantryTiltError",
    "InconsistentGeometryError",
    "IrregularSpacingError",
    "MissingSlicesError",
    "MixedOrientationError",
    "MixedSeriesError",
    "NotCTError",
    "PixelDataError",
    "TooFewSlicesError",
    "UnreadableFileError",
    "UnsupportedTransferSyntaxError",
    "VolumeError",
    "load_series",
]

CT_IMAGE_STORAGE = str(CTImageStorage)
ENHANCED_CT_IMAGE_STORAGE = str(EnhancedCTImageStorage)
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = str(LegacyConvertedEnhancedCTImageStorage)
_MULTIFRAME_CT = {ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
_CT_CLASSES = {CT_IMAGE_STORAGE, *_MULTIFRAME_CT}

_ORIENTATION_TOL = 1e-3  # max abs difference between direction cosines of two slices
_SPACING_TOL = 1e-3  # mm, max difference in PixelSpacing between slices
_DUPLICATE_TOL = 1e-2  # mm along the normal below which two slices are the same position
_IRREGULAR_FRACTION = 0.1  # of the median spacing: max distance of a slice from its grid place


class VolumeError(ValueError):
    """The input cannot be loaded as one regular CT volume. Subclasses say why."""


class UnreadableFileError(VolumeError):
    """A given file is not a DICOM file."""


class NotCTError(VolumeError):
    """An instance is not a CT image."""


class MixedSeriesError(VolumeError):
    """The input holds instances of more than one series or frame of reference."""


class MixedOrientationError(VolumeError):
    """The slices do not all have the same Image Orientation (Patient)."""


class InconsistentGeometryError(VolumeError):
    """Rows, Columns or Pixel Spacing differ between slices, or geometry is missing/invalid."""


class DuplicatePositionError(VolumeError):
    """Two slices lie at the same position along the slice normal."""


class MissingSlicesError(VolumeError):
    """A gap between neighbouring slices is larger than the series' spacing allows."""


class IrregularSpacingError(VolumeError):
    """Slices are not equally spaced along one line, so one affine cannot describe them."""


class GantryTiltError(VolumeError):
    """The slice positions run at an angle to the slice normal (tilted gantry)."""


class TooFewSlicesError(VolumeError):
    """Fewer slices than the analysis needs."""


class PixelDataError(VolumeError):
    """Pixel data is missing, not monochrome or could not be decoded."""


class UnsupportedTransferSyntaxError(VolumeError):
    """No installed pixel data handler can decode the transfer syntax."""


@dataclass(frozen=True)
class _Frame:
    """Geometry and rescale of one 2D slice: one single-frame instance or one frame."""

    source: int  # index into the list of headers
    frame_index: int | None  # 0-based frame in a multi-frame instance, None for single-frame
    ipp: np.ndarray  # (3,)
    iop: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    thickness: float | None  # Slice Thickness in mm; None when absent or unreadable
    rows: int
    columns: int
    slope: float
    intercept: float


def load_series(
    sources: str | os.PathLike[str] | Dataset | Iterable[str | os.PathLike[str] | Dataset],
    *,
    min_slices: int = 8,
    max_tilt_degrees: float = 2.0,
    gap_factor: float = 1.5,
) -> Volume:
    """Load one CT series as a `Volume` (float32 HU, (k, j, i) order, LPS affine).

    Parameters
    ----------
    sources
        A directory (every DICOM file under it is read; other files are skipped), one file,
        an iterable of file paths, or an iterable of pydicom datasets, all of one series.
    min_slices
        Refuse series with fewer slices (at least 2 are always needed).
    max_tilt_degrees
        Refuse series whose slice positions run at a larger angle to the slice normal.
    gap_factor
        Refuse series with a gap between neighbouring slices larger than this many times
        the median spacing.

    Error messages name an instance as "input #n": its position in `sources`, or in the
    name-sorted list of DICOM files found under a directory (files without the DICM
    preamble are skipped there).

    Raises
    ------
    VolumeError
        A subclass naming the problem: `NotCTError`, `MixedSeriesError`,
        `MixedOrientationError`, `InconsistentGeometryError`, `DuplicatePositionError`,
        `MissingSlicesError`, `IrregularSpacingError`, `GantryTiltError`,
        `TooFewSlicesError`, `PixelDataError`, `UnsupportedTransferSyntaxError`,
        `UnreadableFileError`.
    """
    items = _as_items(sources)
    headers = [_read_header(item, n) for n, item in enumerate(items)]
    if not headers:
        raise TooFewSlicesError("no DICOM instances were given; pass the files of one CT series")
    _check_instances(headers)

    frames = [f for n, ds in enumerate(headers) for f in _frames_of(ds, n)]
    if len(frames) < max(min_slices, 2):
        raise TooFewSlicesError(
            f"the series has {len(frames)} slice(s), at least {max(min_slices, 2)} are needed; "
            "send the complete series (thin-slice axial reconstructions work best)"
        )
    row_cos, col_cos, normal, pixel_spacing, shape = _common_plane(frames)

    frames.sort(key=lambda f: float(f.ipp @ normal))
    ipps = np.stack([f.ipp for f in frames])
    step = _check_positions(ipps, normal, max_tilt_degrees, gap_factor, headers, frames)

    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_cos * pixel_spacing[0]
    affine[:3, 2] = row_cos * pixel_spacing[1]
    affine[:3, 3] = ipps[0]

    array = np.empty((len(frames), *shape), dtype=np.float32)
    _fill_pixels(array, items, headers, frames)

    first = headers[0]
    slices = tuple(
        SliceRef(
            sop_instance_uid=str(headers[f.source].SOPInstanceUID),
            sop_class_uid=str(headers[f.source].SOPClassUID),
            frame_number=None if f.frame_index is None else f.frame_index + 1,
        )
        for f in frames
    )
    return Volume(
        array=array,
        affine=affine,
        slices=slices,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        slice_thickness_mm=_median_thickness(frames),
    )


def _median_thickness(frames: list[_Frame]) -> float | None:
    known = [f.thickness for f in frames if f.thickness is not None]
    return float(np.median(known)) if known else None


# --- reading --------------------------------------------------------------------------------


def _as_items(
    sources: str | os.PathLike[str] | Dataset | Iterable[str | os.PathLike[str] | Dataset],
) -> list[Path | Dataset]:
    if isinstance(sources, Dataset):
        return [sources]
    if isinstance(sources, str | os.PathLike):
        path = Path(sources)
        if path.is_dir():
            return [p for p in sorted(path.rglob("*")) if p.is_file() and _is_dicom_file(p)]
        return [path]
    # mypy keeps Dataset (itself iterable, of DataElements) in the union after the first check
    items = cast("Iterable[str | os.PathLike[str] | Dataset]", sources)
    return [s if isinstance(s, Dataset) else Path(s) for s in items]


def _is_dicom_file(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(item: Path | Dataset, n: int) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return pydicom.dcmread(item, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UnreadableFileError(
            f"input #{n} could not be read as a DICOM file ({type(exc).__name__}); "
            "pass only DICOM Part 10 files of one CT series"
        ) from None


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _check_instances(headers: list[Dataset]) -> None:
    """Refuse non-CT instances, mixed series and transfer syntaxes nothing can decode."""
    for n, ds in enumerate(headers):
        modality = str(ds.get("Modality", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
        if modality != "CT":
            raise NotCTError(
                f"input #{n} has Modality {modality or '(missing)'!r}, not 'CT'; nodal analyses "
                "CT series only — route only CT series to the node"
            )
        if sop_class not in _CT_CLASSES:
            raise NotCTError(
                f"input #{n} has SOP Class UID {sop_class or '(missing)'}, which is not a CT "
                "image (CT Image Storage or Enhanced CT Image Storage); exclude localizers, "
                "secondary captures and reports from the series"
            )
    for keyword, what in (
        ("SeriesInstanceUID", "series"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        found = {str(ds.get(keyword, "")) for ds in headers}
        if len(found) > 1:
            raise MixedSeriesError(
                f"the input holds {len(found)} different {what} ({keyword}); pass the "
                "instances of exactly one series"
            )
    for ts in sorted({_transfer_syntax(ds) or "" for ds in headers}):
        if ts:
            _check_decodable(UID(ts))


def _check_decodable(ts: UID) -> None:
    name = f"{ts} ({ts.name})" if ts.name != ts else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {name} cannot be decoded by pydicom; have the sender "
            "transcode to Explicit VR Little Endian or a lossless JPEG/JPEG 2000/RLE syntax"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {name} cannot be decoded here: no pixel data plugin is installed "
            f"({missing}); install one (e.g. pylibjpeg with its plugins) or have the sender "
            "transcode to Explicit VR Little Endian"
        )


def _functional_group(ds: Dataset, frame: int, macro: str, attribute: str | None = None) -> Any:
    """The first item of `macro` for `frame` (per-frame if present, else shared), or one of
    its attributes when `attribute` is given; None when absent."""
    item = None
    for groups, index in (
        (ds.get("PerFrameFunctionalGroupsSequence"), frame),
        (ds.get("SharedFunctionalGroupsSequence"), 0),
    ):
        if groups is not None and index < len(groups) and macro in groups[index]:
            seq = groups[index][macro].value
            item = seq[0] if len(seq) else None
            break
    if item is None or attribute is None:
        return item
    return item.get(attribute)


def _floats(value: Any, count: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise InconsistentGeometryError(
            f"{where} has no valid {what}; the series cannot be placed in patient space — "
            "check that the sender does not strip geometry attributes"
        )
    return arr


def _frames_of(ds: Dataset, n: int) -> list[_Frame]:
    where = f"input #{n}"
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if str(ds.SOPClassUID) not in _MULTIFRAME_CT:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise PixelDataError(
                f"{where} is a CT Image Storage instance with more than one frame; "
                "this is not a valid CT image — resend the series"
            )
        slope, intercept = _rescale(ds)
        return [
            _Frame(
                source=n,
                frame_index=None,
                ipp=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
                iop=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
                pixel_spacing=tuple(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)),
                thickness=_thickness(ds.get("SliceThickness")),
                rows=rows,
                columns=columns,
                slope=slope,
                intercept=intercept,
            )
        ]

    n_frames = int(ds.get("NumberOfFrames", 0) or 0)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames < 1 or per_frame is None or len(per_frame) != n_frames:
        raise InconsistentGeometryError(
            f"{where} is a multi-frame CT whose NumberOfFrames does not match its "
            "PerFrameFunctionalGroupsSequence; the file is damaged — resend it"
        )
    frames = []
    for f in range(n_frames):
        here = f"frame {f + 1} of {where}"
        ipp = _functional_group(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        iop = _functional_group(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional_group(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        transform = _functional_group(ds, f, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds)
        frames.append(
            _Frame(
                source=n,
                frame_index=f,
                ipp=_floats(ipp, 3, "ImagePositionPatient", here),
                iop=_floats(iop, 6, "ImageOrientationPatient", here),
                pixel_spacing=tuple(_floats(spacing, 2, "PixelSpacing", here)),
                thickness=_thickness(_functional_group(ds, f, "PixelMeasuresSequence", "SliceThickness")),
                rows=rows,
                columns=columns,
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _thickness(value: Any) -> float | None:
    """Slice Thickness (Type 2: may be empty) in mm, None when absent, empty or not above 0;
    it only informs the results' remarks, so a malformed value is not an error."""
    try:
        thickness = float(value)
    except (TypeError, ValueError):
        return None
    return thickness if thickness > 0 else None


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (
        float(slope) if slope not in (None, "") else 1.0,
        float(intercept) if intercept not in (None, "") else 0.0,
    )


# --- geometry --------------------------------------------------------------------------------


def _common_plane(
    frames: list[_Frame],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    """Check that all slices share orientation, size and pixel spacing; return them."""
    first = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise InconsistentGeometryError(
                f"slices have different sizes ({first.rows}x{first.columns} and "
                f"{f.rows}x{f.columns} pixels); the input mixes reconstructions — "
                "pass one series"
            )
        if np.max(np.abs(np.subtract(f.pixel_spacing, first.pixel_spacing))) > _SPACING_TOL:
            raise InconsistentGeometryError(
                f"slices have different PixelSpacing ({_mm(first.pixel_spacing)} and "
                f"{_mm(f.pixel_spacing)} mm); the input mixes reconstructions — pass one series"
            )
        if np.max(np.abs(f.iop - first.iop)) > _ORIENTATION_TOL:
            raise MixedOrientationError(
                f"slices have different ImageOrientationPatient ({_mm(first.iop)} and "
                f"{_mm(f.iop)}); the input mixes planes (e.g. a localizer or a reformat) — "
                "pass one series with a single orientation"
            )
    if first.rows < 1 or first.columns < 1:
        raise PixelDataError("the slices have no Rows/Columns; the images are damaged")
    if min(first.pixel_spacing) <= 0:
        raise InconsistentGeometryError(
            f"PixelSpacing {_mm(first.pixel_spacing)} is not positive; the images are damaged"
        )
    row_cos, col_cos = first.iop[:3], first.iop[3:]
    norms = np.linalg.norm(row_cos), np.linalg.norm(col_cos)
    if min(norms) < 0.9 or abs(float(row_cos @ col_cos)) > 0.01 * norms[0] * norms[1]:
        raise InconsistentGeometryError(
            f"ImageOrientationPatient {_mm(first.iop)} does not hold two orthogonal unit "
            "vectors; the images are damaged"
        )
    row_cos, col_cos = row_cos / norms[0], col_cos / norms[1]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    return row_cos, col_cos, normal, first.pixel_spacing, (first.rows, first.columns)


def _check_positions(
    ipps: np.ndarray,
    normal: np.ndarray,
    max_tilt_degrees: float,
    gap_factor: float,
    headers: list[Dataset],
    frames: list[_Frame],
) -> np.ndarray:
    """Refuse duplicate, missing, tilted or irregular slices; return the slice step vector."""
    positions = ipps @ normal
    gaps = np.diff(positions)
    k = int(np.argmin(gaps))
    if gaps[k] < _DUPLICATE_TOL:
        a, b = headers[frames[k].source], headers[frames[k + 1].source]
        same_instance = frames[k].frame_index == frames[k + 1].frame_index and str(
            a.get("SOPInstanceUID", "")
        ) == str(b.get("SOPInstanceUID", ""))
        hint = (
            "the same instance was given twice — pass each file once"
            if same_instance
            else "the series may hold two acquisitions or repeated reconstructions — "
            "split it by AcquisitionNumber or resend the series"
        )
        raise DuplicatePositionError(
            f"slices {k} and {k + 1} lie at the same position ({positions[k]:.2f} mm along "
            f"the slice normal); {hint}"
        )
    count = len(positions)
    median = float(np.median(gaps))
    k = int(np.argmax(gaps))
    if gaps[k] > gap_factor * median:
        missing = max(1, round(gaps[k] / median) - 1)
        raise MissingSlicesError(
            f"gap of {gaps[k]:.1f} mm between slice {k} and {k + 1} (of {count}, sorted along "
            f"the slice normal), median spacing {median:.1f} mm: about {missing} slice(s) "
            "missing; wait for the complete series or resend it"
        )

    step = (ipps[-1] - ipps[0]) / (count - 1)
    cos_tilt = abs(float(step @ normal)) / float(np.linalg.norm(step))
    tilt = float(np.degrees(np.arccos(min(1.0, cos_tilt))))
    if tilt > max_tilt_degrees:
        raise GantryTiltError(
            f"gantry tilt: slice positions run at {tilt:.1f} degrees to the slice normal "
            f"(limit {max_tilt_degrees:g}); resample the series onto an untilted grid "
            "(e.g. reconstruct without tilt at the scanner) or raise max_tilt_degrees"
        )

    expected = ipps[0] + np.arange(count)[:, None] * step
    deviation = np.linalg.norm(ipps - expected, axis=1)
    k = int(np.argmax(deviation))
    if deviation[k] > _IRREGULAR_FRACTION * median:
        raise IrregularSpacingError(
            f"slice {k} (of {count}, sorted along the slice normal) lies {deviation[k]:.2f} mm "
            f"from its place on an evenly spaced grid (median spacing {median:.2f} mm); "
            "variable slice spacing is not supported — resample to even spacing"
        )
    return step


def _mm(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --- pixels ----------------------------------------------------------------------------------


def _fill_pixels(
    array: np.ndarray,
    items: list[Path | Dataset],
    headers: list[Dataset],
    frames: list[_Frame],
) -> None:
    """Decode every slice into its place in `array` (k order) and apply the rescale."""
    by_source: dict[int, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        by_source.setdefault(f.source, []).append((k, f))
    expected = array.shape[1:]
    for source, slots in sorted(by_source.items()):
        header = headers[source]
        if int(header.get("SamplesPerPixel", 1) or 1) != 1:
            raise PixelDataError(
                f"input #{source} has SamplesPerPixel {header.SamplesPerPixel}; CT images "
                "must be monochrome — exclude colour images from the series"
            )
        order = sorted(slots, key=lambda s: s[1].frame_index or 0)
        # the frames of a multi-frame instance all carry their index, a single frame none
        indices = [f.frame_index for _, f in order if f.frame_index is not None]
        multi = bool(indices)
        try:
            decoded = _iter_frames(items[source], header, indices if multi else None)
            for (k, f), raw in zip(order, decoded, strict=True):
                if raw.shape != expected:
                    raise PixelDataError(
                        f"input #{source} decoded to {raw.shape} pixels, but Rows/Columns say "
                        f"{expected}; the file is damaged — resend it"
                    )
                if f.slope == 1.0 and f.intercept == 0.0:
                    array[k] = raw
                else:
                    np.multiply(raw, f.slope, out=array[k], dtype=np.float32, casting="unsafe")
                    array[k] += np.float32(f.intercept)
        except (VolumeError, MemoryError):
            raise
        except Exception as exc:
            raise PixelDataError(_pixel_problem(source, exc)) from None


def _pixel_problem(source: int, exc: Exception) -> str:
    if isinstance(exc, AttributeError) and "Pixel Data" in str(exc):
        return (
            f"input #{source} has no pixel data (PixelData is missing); resend the "
            "instance — it may have been stored without its image"
        )
    return (
        f"the pixel data of input #{source} could not be decoded ({type(exc).__name__}); "
        "the file may be truncated or damaged — resend it"
    )


def _iter_frames(item: Path | Dataset, header: Dataset, indices: list[int] | None) -> Iterator[np.ndarray]:
    """Yield the decoded frames of one instance (all of them when `indices` is None)."""
    if isinstance(item, Path):
        if _transfer_syntax(header) == DeflatedExplicitVRLittleEndian:
            item = pydicom.dcmread(item)
        else:
            if _transfer_syntax(header) is None:
                raise UnsupportedTransferSyntaxError(
                    "a file has no Transfer Syntax UID in its file meta; have the sender "
                    "write DICOM Part 10 files"
                )
            return iter_pixels(item, indices=indices)
    if "PixelData" not in item:
        raise AttributeError("no 'Pixel Data' element")
    return iter_pixels(_with_transfer_syntax(item), indices=indices)


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """`ds` itself, or a light view of its image pixel elements with a transfer syntax."""
    if _transfer_syntax(ds) is not None:
        return ds
    if ds["PixelData"].is_undefined_length:
        raise UnsupportedTransferSyntaxError(
            "a dataset holds encapsulated (compressed) pixel data but no Transfer Syntax UID "
            "in its file meta; set ds.file_meta.TransferSyntaxUID"
        )
    implicit = getattr(ds, "original_encoding", (None, True))[0]
    view = Dataset()
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    for elem in ds:
        if elem.tag.group == 0x0028 or elem.tag == 0x7FE00010:
            view.add(elem)
    return view
