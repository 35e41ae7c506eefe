"""The two networks: a 3D U-Net for node segmentation and a small 3D CNN for malignancy."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

HEAD_FEATURES = 4  # U-Net outputs feeding the 1x1x1 head (more costs full-resolution compute)


def build_segmenter(channels: tuple[int, ...] = (16, 32, 64, 128), res_units: int = 1) -> nn.Module:
    """MONAI U-Net with a 1x1x1 convolution head: one CT channel in, one node logit out.

    The head matters: MONAI's U-Net ends in an up-sampling layer whose instance norm, with a
    single output channel, normalises the logits of each window to zero mean and unit
    variance, which caps how confident the network can become (seen as logits stuck near
    zero). Giving the U-Net a few outputs and a plain convolution after it removes the cap.
    """
    unet = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=HEAD_FEATURES,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=res_units,
        norm="instance",
    )
    return nn.Sequential(unet, nn.Conv3d(HEAD_FEATURES, 1, kernel_size=1))


#: Scalar measurements the classifier head sees beside the crop (mm, scaled by 1/20).
CLASSIFIER_SCALARS = ("short_axis_mm", "long_axis_mm", "short_long_ratio")


class NodeClassifier(nn.Module):
    """Crop (CT + node mask) -> conv features; with the measurements -> malignancy logit."""

    def __init__(self, width: int = 16, n_scalars: int = len(CLASSIFIER_SCALARS), in_channels: int = 2):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(2),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, 2 * width),
            block(2 * width, 4 * width),
            block(4 * width, 4 * width),
        )
        self.head = nn.Sequential(
            nn.Linear(8 * width + n_scalars, 32),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(32, 1),
        )

    def forward(self, crop: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        f = self.features(crop)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        return self.head(torch.cat([pooled, scalars], dim=1)).squeeze(1)


def classifier_scalars(short_axis_mm: float, long_axis_mm: float) -> list[float]:
    return [short_axis_mm / 20.0, long_axis_mm / 20.0, short_axis_mm / max(long_axis_mm, 1e-3)]
