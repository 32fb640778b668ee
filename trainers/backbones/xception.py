"""Aligned Xception-65 at output stride 16, with UniMatch's parameter names (its xception.pth loads).

At output stride 16 the published network has no dilated convs: block 3 is the last to stride.

`forward(x) -> (c1, c4)`: c1 is block 2's features before its strided conv (256 channels,
stride 4), c4 the last separable conv's output (2048 channels, stride 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The TF reference's BatchNorm decay 0.9997, in PyTorch's convention.
BN_MOMENTUM = 0.0003


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 + BN, pointwise 1x1 + BN; ReLU before (`relu_first`) or after each BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1, relu_first: bool = True) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, padding=1, groups=cin, bias=False)
        self.bn1 = bn(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = bn(cout)
        self.relu_first = relu_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_first:
            return self.bn2(self.pointwise(self.bn1(self.depthwise(F.relu(x)))))
        x = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(x)))


class Block(nn.Module):
    """Three separable convs with a residual; the last conv strides."""

    def __init__(self, cin: int, cout: int, stride: int = 1, grow_first: bool = True) -> None:
        super().__init__()
        self.skip = None
        if cin != cout or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.skipbn = bn(cout)
        mid = cout if grow_first else cin
        self.sepconv1 = SeparableConv2d(cin, mid)
        self.sepconv2 = SeparableConv2d(mid, cout)
        self.sepconv3 = SeparableConv2d(cout, cout, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, features before the last conv)."""
        # The published code's in-place ReLU also rectifies the identity shortcut; its weights
        # were trained that way, so the shortcut is relu(x).
        skip = F.relu(x) if self.skip is None else self.skipbn(self.skip(x))
        hook = self.sepconv2(self.sepconv1(x))
        return self.sepconv3(hook) + skip, hook


class Xception65(nn.Module):
    low_channels = 256
    high_channels = 2048
    output_stride = 16
    reduce_channels = 48
    fuse_channels = 256

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = bn(32)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        self.bn2 = bn(64)
        self.block1 = Block(64, 128, 2)
        self.block2 = Block(128, 256, 2)
        self.block3 = Block(256, 728, 2)
        for i in range(4, 20):
            self.add_module(f"block{i}", Block(728, 728))
        self.block20 = Block(728, 1024, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536, relu_first=False)
        self.conv4 = SeparableConv2d(1536, 1536, relu_first=False)
        self.conv5 = SeparableConv2d(1536, 2048, relu_first=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x, _ = self.block1(x)
        x, c1 = self.block2(x)
        for i in range(3, 21):
            x, _ = getattr(self, f"block{i}")(x)
        return c1, self.conv5(self.conv4(self.conv3(x)))


def xception65() -> Xception65:
    """Aligned Xception-65 (UniMatch's xception.pth)."""
    return Xception65()
