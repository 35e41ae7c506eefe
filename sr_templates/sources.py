"""The analysed CT series as the writers need it: checked, indexed, with a safe header.

`prepare_sources` checks that the source datasets and the `StudyFindings` describe the same
series and geometry, maps every volume slice ``k`` to its source instance (and frame), and
makes a header-only copy of the first dataset in which missing Type 2 patient/study
attributes are present but empty, so that highdicom can copy them into the results.  The
caller's datasets are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from inference.findings import StudyFindings

#: Type 2 attributes of the Patient and General Study modules that results copy.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)

_PIXEL_KEYWORDS = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"}

#: Largest allowed distance between a slice's position in the volume affine and the position
#: its source image declares, as a fraction of the slice step (`inference.dicom_volume`
#: accepts slices up to 0.1 step off an even grid), plus an absolute floor in mm.
POSITION_TOLERANCE_FRACTION = 0.25
POSITION_TOLERANCE_MM = 0.05


class SourceMismatchError(ValueError):
    """The source datasets do not match the findings (other series, shape or geometry)."""


@dataclass(frozen=True)
class Plane:
    """Where volume slice k lives in the source: dataset index, frame, position."""

    dataset_index: int
    frame_number: int | None  # 1-based, None for single-frame instances
    plane_index: int  # 0-based index into the source frames in SEG pixel-array order
    position: tuple[float, float, float]  # ImagePositionPatient of the plane


@dataclass(frozen=True)
class SourceSeries:
    """Checked source datasets plus the slice-to-source mapping."""

    datasets: tuple[Dataset, ...]  # as given by the caller
    header: Dataset  # header-only copy of datasets[0], Type 2 attributes filled
    is_multiframe: bool
    rows: int
    columns: int
    number_of_planes: int  # number of source frames (multi-frame) or instances
    planes: tuple[Plane, ...]  # planes[k] is volume slice k

    @property
    def for_highdicom(self) -> list[Dataset]:
        """Source images for highdicom: the patched header first, the rest untouched."""
        return [self.header, *self.datasets[1:]]

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    def dataset_of_slice(self, k: int) -> Dataset:
        return self.datasets[self.planes[k].dataset_index]


def header_copy(ds: Dataset) -> Dataset:
    """A new dataset with the elements of `ds` except pixel data (elements are shared)."""
    out = Dataset()
    for elem in ds:
        if elem.keyword in _PIXEL_KEYWORDS:
            continue
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def fill_type2(ds: Dataset) -> Dataset:
    """Add the missing Type 2 patient/study attributes of `ds` as empty values (in place)."""
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def _frame_position(ds: Dataset, frame_number: int) -> tuple[float, float, float]:
    try:
        item = ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
        return tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)  # type: ignore[return-value]
    except (AttributeError, IndexError) as exc:
        raise SourceMismatchError(
            f"frame {frame_number} of the multi-frame source has no Plane Position "
            "(Per-frame Functional Groups Sequence > Plane Position Sequence)"
        ) from exc


def prepare_sources(source_datasets: Sequence[Dataset], study_findings: StudyFindings) -> SourceSeries:
    """Check `source_datasets` against `study_findings` and index them.

    Raises
    ------
    SourceMismatchError
        When the datasets are of another study, series or frame of reference, when a slice
        of the findings refers to an instance or frame that is not among the datasets, or
        when the slice positions or the image size do not match the volume.
    """
    datasets = tuple(source_datasets)
    if not datasets:
        raise SourceMismatchError("no source datasets given; pass the analysed CT series")
    first = datasets[0]
    for name, expected in (
        ("StudyInstanceUID", study_findings.study_instance_uid),
        ("SeriesInstanceUID", study_findings.series_instance_uid),
        ("FrameOfReferenceUID", study_findings.frame_of_reference_uid),
    ):
        values = {str(ds.get(name, "")) for ds in datasets}
        if values != {str(expected)}:
            raise SourceMismatchError(
                f"source datasets have {name} {sorted(values)}, the findings {expected!r}; "
                "pass the datasets of the analysed series only"
            )

    is_multiframe = int(first.get("NumberOfFrames", 1) or 1) > 1 or (
        "PerFrameFunctionalGroupsSequence" in first
    )
    if is_multiframe and len(datasets) != 1:
        raise SourceMismatchError(
            f"got {len(datasets)} datasets of which the first is multi-frame; "
            "pass exactly one Enhanced CT dataset or only single-frame images"
        )
    rows, columns = int(first.Rows), int(first.Columns)
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise SourceMismatchError("source images differ in Rows/Columns")

    shape = tuple(int(s) for s in study_findings.shape)
    if len(study_findings.slices) != shape[0]:
        raise SourceMismatchError(
            f"findings have {len(study_findings.slices)} slice references for {shape[0]} slices"
        )
    if shape[1:] != (rows, columns):
        raise SourceMismatchError(
            f"volume slices are {shape[1]}x{shape[2]} but the source images are "
            f"{rows}x{columns}; the writers need the volume in the source grid"
        )

    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    number_of_planes = int(first.get("NumberOfFrames", 1) or 1) if is_multiframe else len(datasets)
    planes: list[Plane] = []
    for k, ref in enumerate(study_findings.slices):
        index = by_uid.get(str(ref.sop_instance_uid))
        if index is None:
            raise SourceMismatchError(
                f"slice {k} refers to SOP Instance {ref.sop_instance_uid}, "
                "which is not among the source datasets"
            )
        ds = datasets[index]
        if is_multiframe:
            frame = ref.frame_number
            if frame is None or not 1 <= frame <= number_of_planes:
                raise SourceMismatchError(
                    f"slice {k} refers to frame {frame} of a {number_of_planes}-frame image"
                )
            position = _frame_position(ds, frame)
            plane_index = frame - 1
        else:
            frame = None
            position = tuple(float(v) for v in ds.ImagePositionPatient)  # type: ignore[assignment]
            plane_index = index
        planes.append(Plane(index, frame, plane_index, position))

    _check_positions(planes, np.asarray(study_findings.affine, dtype=float))
    header = fill_type2(header_copy(first))
    return SourceSeries(
        datasets=datasets,
        header=header,
        is_multiframe=is_multiframe,
        rows=rows,
        columns=columns,
        number_of_planes=number_of_planes,
        planes=tuple(planes),
    )


def _check_positions(planes: Sequence[Plane], affine: np.ndarray) -> None:
    """Each slice's origin in the affine must be where its source image says it is."""
    if affine.shape != (4, 4):
        raise SourceMismatchError(f"affine must be 4x4, got {affine.shape}")
    k = np.arange(len(planes), dtype=float)
    expected = affine[:3, 3] + np.outer(k, affine[:3, 0])
    actual = np.array([p.position for p in planes], dtype=float)
    error = np.linalg.norm(expected - actual, axis=1)
    tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * float(np.linalg.norm(affine[:3, 0])))
    worst = int(np.argmax(error)) if len(error) else 0
    if len(error) and error[worst] > tolerance:
        raise SourceMismatchError(
            f"slice {worst} is at {actual[worst].round(3).tolist()} in its source image but at "
            f"{expected[worst].round(3).tolist()} in the volume affine; the findings do not "
            "belong to this geometry"
        )
