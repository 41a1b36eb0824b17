"""ResNet-18: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, https://arxiv.org/abs/1512.03385.

Module layout and state-dict keys follow torchvision's ``resnet18``, so its pretrained weights load directly.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._utils import init_weights, make_divisible


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; the skip path is a strided 1x1 conv + BN when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()  # after the addition
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 with BasicBlocks, [2, 2, 2, 2] per stage (He et al., 2016): 11.69M parameters at width 1.0 with
    1000 classes.

    Args:
        num_classes: size of the classifier output.
        width_mult: multiplies the stage widths 64/128/256/512 (rounded to a multiple of 8).
        in_channels: channels of the input image (1 for grey-scale digits).
        small_input: CIFAR-style stem for 8x8..32x32 images: a 3x3 stride-1 conv and no max-pool instead of the
            7x7 stride-2 conv + 3x3 stride-2 max-pool, so the total stride drops from 32 to 8 (32x32 -> 4x4 and
            8x8 -> 1x1 before pooling).
    """

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3, small_input: bool = False
    ):
        super().__init__()
        widths = [make_divisible(w * width_mult) for w in (64, 128, 256, 512)]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        channels = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width)))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))
