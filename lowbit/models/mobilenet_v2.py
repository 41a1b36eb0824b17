"""MobileNet-v2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
https://arxiv.org/abs/1801.04381.

Module layout and state-dict keys follow torchvision's ``mobilenet_v2``, so its pretrained weights load directly.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._utils import PooledClassifier, conv_bn_act, make_divisible

# (expansion t, output channels c, repeats n, first stride s): Table 2 of the paper.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, with a skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(PooledClassifier):
    """MobileNet-v2 (Sandler et al., 2018): 3.50M parameters at width 1.0 with 1000 classes.

    Args:
        num_classes: size of the classifier output.
        width_mult: multiplies every channel count (rounded to a multiple of 8); the last conv keeps 1280 channels
            for ``width_mult < 1``, as in the paper.
        in_channels: channels of the input image (1 for grey-scale digits).
        small_input: adapts the network to 8x8..32x32 images: the stem conv and the first stride-2 stage
            (t=6, c=24) use stride 1 instead of 2, so the total stride drops from 32 to 8 (32x32 -> 4x4 and
            8x8 -> 1x1 before pooling). Parameter count is unchanged.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        small_input: bool = False,
        dropout: float = 0.2,
    ):
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_act(in_channels, channels, 3, 1 if small_input else 2, activation=nn.ReLU6)]
        for t, c, n, s in SETTINGS:
            if small_input and c == 24:  # the first stride-2 stage
                s = 1
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        layers.append(conv_bn_act(channels, last_channels, 1, activation=nn.ReLU6))
        super().__init__(layers, nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes)))
