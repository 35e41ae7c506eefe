"""From a native CT volume to the network's working grid and back.

The working grid is the native grid cropped to the body and resampled (trilinear, corners
aligned) to an isotropic working spacing. `Grid` keeps the mapping so that results found on
the working grid can be carried back to native voxels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: HU window the networks see: values are clipped to it and scaled to about [-1, 1].
HU_WINDOW = (-250.0, 350.0)
BODY_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class Grid:
    """Working grid = native[crop] resampled; index maps in both directions."""

    crop_lo: tuple[int, int, int]  # native index of working index 0
    native_shape: tuple[int, int, int]  # shape of the native crop
    working_shape: tuple[int, int, int]
    working_spacing: tuple[float, float, float]  # effective spacing per axis, mm

    @property
    def scale(self) -> np.ndarray:
        """Native voxels per working voxel along each axis."""
        n, w = np.array(self.native_shape, float), np.array(self.working_shape, float)
        return np.where(w > 1, (n - 1) / np.maximum(w - 1, 1), 1.0)

    def to_native(self, kji_working: np.ndarray) -> np.ndarray:
        return np.asarray(kji_working, float) * self.scale + np.array(self.crop_lo, float)

    def to_working_axis(self, axis: int, native_index: np.ndarray) -> np.ndarray:
        return (np.asarray(native_index, float) - self.crop_lo[axis]) / self.scale[axis]

    def to_working(self, kji_native: np.ndarray) -> np.ndarray:
        return (np.asarray(kji_native, float) - np.array(self.crop_lo, float)) / self.scale


def body_box(hu: np.ndarray, margin: int = 4) -> tuple[slice, slice, slice]:
    """Bounding box of everything denser than air (the body and the table)."""
    body = hu > BODY_THRESHOLD_HU
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(body.any(axis=other))
        if idx.size == 0:
            box.append(slice(0, hu.shape[axis]))
        else:
            box.append(slice(max(0, idx[0] - margin), min(hu.shape[axis], idx[-1] + margin + 1)))
    return tuple(box)  # type: ignore[return-value]


def normalise(hu: np.ndarray | np.floating | torch.Tensor):
    lo, hi = HU_WINDOW
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(lo, hi) - mid) / half
    return (np.clip(hu, lo, hi) - mid) / half


def to_working(
    hu: np.ndarray, spacing: tuple[float, float, float], working_spacing: float, crop: bool = True
) -> tuple[np.ndarray, Grid]:
    """Crop to the body and resample HU to the working spacing (float32, still HU)."""
    grid = working_grid(hu, spacing, working_spacing, crop)
    box = tuple(slice(lo, lo + n) for lo, n in zip(grid.crop_lo, grid.native_shape, strict=True))
    return resample(hu[box], grid.working_shape), grid


def working_grid(
    hu: np.ndarray, spacing: tuple[float, float, float], working_spacing: float, crop: bool = True
) -> Grid:
    """The working grid `to_working` resamples `hu` to, without resampling it."""
    box = body_box(hu) if crop else tuple(slice(0, n) for n in hu.shape)
    native_shape = tuple(b.stop - b.start for b in box)
    shape_w = tuple(
        max(1, round((n - 1) * s / working_spacing) + 1) for n, s in zip(native_shape, spacing, strict=True)
    )
    eff = tuple(
        (n - 1) * s / (w - 1) if w > 1 else s for n, s, w in zip(native_shape, spacing, shape_w, strict=True)
    )
    return Grid(tuple(b.start for b in box), native_shape, shape_w, eff)  # type: ignore[arg-type]


def working_patch(hu: np.ndarray, grid: Grid, lo_w, hi_w) -> np.ndarray:
    """The working image of `grid` for working indices lo_w <= kji < hi_w only: what
    `to_working` gives there (trilinear, corners aligned), without resampling the rest."""
    axes = [
        np.arange(a, b) * grid.scale[i] + grid.crop_lo[i]
        for i, (a, b) in enumerate(zip(lo_w, hi_w, strict=True))
    ]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(hu, coords, order=1, mode="nearest", output=np.float32)


def resample(array: np.ndarray, shape: tuple[int, int, int], mode: str = "trilinear") -> np.ndarray:
    """Resample a 3D array to `shape` with aligned corners, in slabs to bound memory."""
    src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if tuple(src.shape) == tuple(shape):
        return src.numpy()
    with torch.inference_mode():
        y = F.interpolate(src[None, None], size=shape, mode=mode, align_corners=True)
    return y[0, 0].numpy()
