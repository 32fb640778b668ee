"""A small CPU backbone that sees shapes: output stride 8, wider than `tiny`, same interface.

`forward(x) -> (c1, c4)`: c1 at stride 4, c4 at stride 8 (the last two stages dilated instead of
strided, as DeepLab does at output stride 8), so a 64-px crop still leaves an 8x8 feature map.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.backbones.tiny import BasicBlock, conv_bn


class Small(nn.Module):
    low_channels = 24
    high_channels = 128
    output_stride = 8
    reduce_channels = 24
    fuse_channels = 64

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 24, stride=2), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(24, 24, stride=2)
        self.layer2 = BasicBlock(24, 48, stride=2)
        self.layer3 = nn.Sequential(BasicBlock(48, 96, dilation=2), BasicBlock(96, 96, dilation=2))
        self.layer4 = nn.Sequential(BasicBlock(96, 128, dilation=4), BasicBlock(128, 128, dilation=4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        return c1, self.layer4(self.layer3(self.layer2(c1)))


def small() -> Small:
    """About 1 M parameters; c1 24 channels at stride 4, c4 128 channels at stride 8."""
    return Small()
