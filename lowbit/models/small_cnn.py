"""A small LeNet-style conv net for 8x8 digit images (e.g. scikit-learn's ``load_digits``); trains in seconds on a CPU.

LeCun et al., "Gradient-Based Learning Applied to Document Recognition", Proc. IEEE 1998, with the conv layers
batch-normalised (Ioffe & Szegedy, ICML 2015, https://arxiv.org/abs/1502.03167) and a global-average-pool head.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._utils import conv_bn_act, init_weights


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks (width, width, 2*width channels) with a 2x2 max-pool after the second,
    global average pooling and a linear head. Works for any input size >= 2x2 (8x8 -> 4x4 before pooling).

    Args:
        num_classes: size of the classifier output.
        in_channels: channels of the input image (1 for grey-scale digits).
        width: channels of the first two convs; the third has ``2 * width``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(in_channels, width),
            conv_bn_act(width, width),
            nn.MaxPool2d(2),
            conv_bn_act(width, 2 * width),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))
