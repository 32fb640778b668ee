"""A small residual backbone for tests and CPU demos, with the interface of the real ones.

`forward(x) -> (c1, c4)` at strides 4 and 16, the last stage dilated like the ResNets'.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride, dilation)
        self.conv2 = conv_bn(cout, cout, dilation=dilation)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + identity)


class Tiny(nn.Module):
    low_channels = 16
    high_channels = 64
    output_stride = 16
    # The decoder shrinks with the backbone; UniMatch's 48/256 would dwarf a 64-channel encoder.
    reduce_channels = 16
    fuse_channels = 32

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, stride=2), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16, stride=2)
        self.layer2 = BasicBlock(16, 24, stride=2)
        self.layer3 = BasicBlock(24, 32, stride=2)
        self.layer4 = BasicBlock(32, 64, dilation=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        return c1, self.layer4(self.layer3(self.layer2(c1)))


def tiny() -> Tiny:
    """About 0.1 M parameters; c1 16 channels at stride 4, c4 64 channels at stride 16."""
    return Tiny()
