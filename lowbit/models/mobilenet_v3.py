"""MobileNet-v3 (small): Howard et al., "Searching for MobileNetV3", ICCV 2019, https://arxiv.org/abs/1905.02244.

Module layout and state-dict keys follow torchvision's ``mobilenet_v3_small``, so its pretrained weights load
directly. As in torchvision, the last 1x1 conv has no squeeze-and-excitation block.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._utils import PooledClassifier, conv_bn_act, make_divisible

# (kernel, expanded channels, output channels, squeeze-excite, activation, stride): Table 2 of the paper.
SETTINGS = [
    (3, 16, 16, True, nn.ReLU, 2),
    (3, 72, 24, False, nn.ReLU, 2),
    (3, 88, 24, False, nn.ReLU, 1),
    (5, 96, 40, True, nn.Hardswish, 2),
    (5, 240, 40, True, nn.Hardswish, 1),
    (5, 240, 40, True, nn.Hardswish, 1),
    (5, 120, 48, True, nn.Hardswish, 1),
    (5, 144, 48, True, nn.Hardswish, 1),
    (5, 288, 96, True, nn.Hardswish, 2),
    (5, 576, 96, True, nn.Hardswish, 1),
    (5, 576, 96, True, nn.Hardswish, 1),
]
BN = {"bn_eps": 1e-3, "bn_momentum": 0.01}  # TensorFlow defaults, as in the reference implementation


class SqueezeExcitation(nn.Module):
    """Hu et al., "Squeeze-and-Excitation Networks" (https://arxiv.org/abs/1709.01507), with a hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when it would not widen) -> kxk depthwise -> optional SE -> 1x1 linear projection."""

    def __init__(
        self,
        in_channels: int,
        kernel: int,
        expanded: int,
        out_channels: int,
        use_se: bool,
        activation: type[nn.Module],
        stride: int,
    ):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv_bn_act(in_channels, expanded, 1, activation=activation, **BN))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, activation=activation, **BN))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn_act(expanded, out_channels, 1, activation=None, **BN))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV3Small(PooledClassifier):
    """MobileNet-v3-small (Howard et al., 2019): 2.54M parameters at width 1.0 with 1000 classes.

    Args:
        num_classes: size of the classifier output.
        width_mult: multiplies every channel count (rounded to a multiple of 8), the 1024-wide head included.
        in_channels: channels of the input image (1 for grey-scale digits).
        small_input: adapts the network to 8x8..32x32 images: the stem conv and the first stride-2 block
            (the 16-channel SE block) use stride 1 instead of 2, so the total stride drops from 32 to 8
            (32x32 -> 4x4 and 8x8 -> 1x1 before pooling). Parameter count is unchanged.
        dropout: dropout probability inside the classifier head.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        small_input: bool = False,
        dropout: float = 0.2,
    ):
        channels = make_divisible(16 * width_mult)
        layers: list[nn.Module] = [
            conv_bn_act(in_channels, channels, 3, 1 if small_input else 2, activation=nn.Hardswish, **BN)
        ]
        for i, (kernel, expanded, out, use_se, activation, stride) in enumerate(SETTINGS):
            if small_input and i == 0:  # the first stride-2 block
                stride = 1
            out = make_divisible(out * width_mult)
            expanded = make_divisible(expanded * width_mult)
            layers.append(InvertedResidual(channels, kernel, expanded, out, use_se, activation, stride))
            channels = out
        last_conv = 6 * channels
        head = make_divisible(1024 * width_mult)
        layers.append(conv_bn_act(channels, last_conv, 1, activation=nn.Hardswish, **BN))
        classifier = nn.Sequential(
            nn.Linear(last_conv, head), nn.Hardswish(), nn.Dropout(dropout), nn.Linear(head, num_classes)
        )
        super().__init__(layers, classifier)
