"""Node segmentation: sliding-window U-Net inference on the working grid."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from inference.preprocess import normalise


def node_probability(
    segmenter: torch.nn.Module,
    image_hu_w: np.ndarray,
    device: torch.device,
    *,
    roi: int = 96,
    overlap: float = 0.25,
    batch_size: int = 2,
    flips: tuple[tuple[int, ...], ...] = (),
) -> np.ndarray:
    """Per-voxel node probability (float32, same shape as the working image), averaged over
    the image and its mirror images `flips` (each the image axes it flips), each run whole.

    On a GPU the network runs in mixed precision; the stitched output stays on the device
    only while the window sums are formed, then comes back to host memory.
    """
    total = _probability(segmenter, image_hu_w, device, roi, overlap, batch_size)
    for axes in flips:
        mirrored = _probability(segmenter, np.flip(image_hu_w, axes), device, roi, overlap, batch_size)
        total += np.flip(mirrored, axes)
    if flips:
        total /= 1 + len(flips)
    return total


def _probability(
    segmenter: torch.nn.Module,
    image_hu_w: np.ndarray,
    device: torch.device,
    roi: int,
    overlap: float,
    batch_size: int,
) -> np.ndarray:
    x = normalise(torch.from_numpy(np.ascontiguousarray(image_hu_w, dtype=np.float32)))[None, None]
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), amp:
        logits = sliding_window_inference(
            x,
            roi_size=(roi,) * 3,
            sw_batch_size=batch_size,
            predictor=segmenter,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device=torch.device("cpu"),
            padding_mode="constant",
            cval=float(normalise(np.float32(-1000.0))),
        )
    return torch.sigmoid(logits.float())[0, 0].numpy()  # type: ignore[union-attr]
