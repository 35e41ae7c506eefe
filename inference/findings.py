"""The values that leave `inference`: one `Finding` per lymph node, one `StudyFindings` per series.

This module is the interface between `inference` and `sr_templates`; it imports only the
standard library and NumPy so that the writers never pull in torch.

Conventions
-----------
* Voxel indices are in array order ``(k, j, i)`` = (slice, row, column) of the loaded
  volume, slices sorted along the slice normal.
* Patient coordinates are DICOM LPS in millimetres.
* Pixel coordinates on a key slice are ``(column, row)`` as DICOM SCOORD wants them: the
  top-left corner of the image is (0, 0), so the centre of pixel (row j, column i) is
  (i + 0.5, j + 0.5) (PS3.3 C.18.6.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference import rules

Point3 = tuple[float, float, float]
Point2 = tuple[float, float]


@dataclass(frozen=True)
class SliceRef:
    """Which source instance (and frame, for multi-frame images) holds slice k."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based; None for single-frame images


@dataclass(frozen=True)
class AxisLine:
    """A diameter measured on the key slice (RECIST style)."""

    length_mm: float
    endpoints_lps_mm: tuple[Point3, Point3]
    endpoints_pixel: tuple[Point2, Point2]  # (column, row) on the key slice, SCOORD convention


@dataclass(frozen=True)
class Finding:
    """One lymph node found in a volume."""

    label: str  # "LN-1", "LN-2", ... in a stable order (largest volume first)
    tracking_uid: str
    bbox: tuple[int, int, int, int, int, int]  # k0, j0, i0, k1, j1, i1 (end exclusive)
    mask: np.ndarray = field(repr=False)  # bool, shape (k1-k0, j1-j0, i1-i0), in the source grid
    centroid_lps_mm: Point3
    centroid_voxel: Point3
    key_slice: int  # k of the axial slice of greatest extent
    long_axis: AxisLine
    short_axis: AxisLine
    volume_mm3: float
    mean_hu: float
    malignancy_probability: float
    size_category: str  # see inference.rules
    flags: tuple[str, ...] = ()  # e.g. ("round", "necrosis")

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "tracking_uid": self.tracking_uid,
            "centroid_lps_mm": _round(self.centroid_lps_mm),
            "short_axis_mm": round(self.short_axis.length_mm, 2),
            "long_axis_mm": round(self.long_axis.length_mm, 2),
            "short_axis_endpoints_lps_mm": [_round(p) for p in self.short_axis.endpoints_lps_mm],
            "long_axis_endpoints_lps_mm": [_round(p) for p in self.long_axis.endpoints_lps_mm],
            "volume_mm3": round(self.volume_mm3, 1),
            "mean_hu": round(self.mean_hu, 1),
            "malignancy_probability": round(self.malignancy_probability, 4),
            "size_category": self.size_category,
            "flags": list(self.flags),
            "key_slice": self.key_slice,
            "bbox": list(self.bbox),
        }

    def full_mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The node's mask in a volume of `shape`."""
        out = np.zeros(shape, dtype=bool)
        k0, j0, i0, k1, j1, i1 = self.bbox
        out[k0:k1, j0:j1, i0:i1] = self.mask
        return out


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    device: str = "cpu"
    #: slices further apart than this and the model misses small nodes (the card's
    #: `limits.max_slice_spacing_mm`); None: the card names no limit
    max_slice_spacing_mm: float | None = None


@dataclass(frozen=True)
class StudyFindings:
    """Everything the result writers need about one analysed series."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slices: tuple[SliceRef, ...]  # slices[k] is the source of slice k
    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)  # 4x4, (k, j, i, 1) -> LPS mm
    model: ModelInfo
    findings: tuple[Finding, ...]
    slice_thickness_mm: float | None = None  # the CT's Slice Thickness; None when unknown

    @property
    def slice_spacing_mm(self) -> float:
        """The distance between neighbouring slices (along the affine's slice axis)."""
        return float(np.linalg.norm(self.affine[:3, 0]))

    @property
    def remarks(self) -> tuple[str, ...]:
        """What the reader must know about the whole result: slices further apart, or
        thicker, than the model finds small nodes reliably on (`rules.slice_remarks`)."""
        return rules.slice_remarks(
            self.slice_spacing_mm, self.model.max_slice_spacing_mm, self.slice_thickness_mm
        )

    def to_json(self) -> dict:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "model": {"name": self.model.name, "version": self.model.version},
            "slice_spacing_mm": round(self.slice_spacing_mm, 2),
            "slice_thickness_mm": rounded(self.slice_thickness_mm, 2),
            "remarks": list(self.remarks),
            "nodes": [f.to_json() for f in self.findings],
        }


def rounded(value: float | None, nd: int) -> float | None:
    """`value` rounded to `nd` decimals for JSON; None stays None."""
    return None if value is None else round(float(value), nd)


def _round(p, nd: int = 2) -> list[float]:
    return [round(float(v), nd) for v in p]
