"""A CT series as a 3D volume in patient space.

`Volume.array` holds Hounsfield units as float32 in array order (k, j, i) = (slice, row,
column), slices sorted by position along the slice normal. `Volume.affine` maps
(k, j, i, 1) to LPS millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.findings import SliceRef


@dataclass(frozen=True)
class Volume:
    array: np.ndarray = field(repr=False)  # float32 HU, shape (K, J, I)
    affine: np.ndarray = field(repr=False)  # 4x4: (k, j, i, 1) -> LPS mm
    slices: tuple[SliceRef, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slice_thickness_mm: float | None = None  # the series' Slice Thickness; None when unknown

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along k, j, i."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    def to_lps(self, kji: np.ndarray) -> np.ndarray:
        """Map voxel coordinates (..., 3) in (k, j, i) order to LPS mm."""
        kji = np.asarray(kji, dtype=float)
        return kji @ self.affine[:3, :3].T + self.affine[:3, 3]
