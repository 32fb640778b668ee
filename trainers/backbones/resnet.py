"""ResNet-50/101 at output stride 16 (or 8), returning stage-1 and stage-4 features.

Two stems: the deep "v1c" stem (three 3x3 convs, 128 channels) of UniMatch's published weights,
and torchvision's single 7x7 conv. Parameter names match both sources' state dicts.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_STRIDES = (16, 8)


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def deep_stem() -> nn.Sequential:
    """conv1 of the v1c ResNet; its last conv's BatchNorm is the model's `bn1`, as in UniMatch."""
    return nn.Sequential(
        conv3x3(3, 64, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 64),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 128),
    )


class ResNet(nn.Module):
    """Bottleneck ResNet; `forward(x) -> (c1, c4)` at strides 4 and `output_stride` (16: the last stage
    dilated, UniMatch's [F, F, T]; 8: the last two, the [F, T, T] of U2PL, ST++ and PS-MT)."""

    low_channels = 256
    high_channels = 2048
    reduce_channels = 48
    fuse_channels = 256

    def __init__(self, depths: tuple[int, int, int, int], deep: bool = True, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"ResNet output stride: expected one of {OUTPUT_STRIDES}, got {output_stride}")
        self.output_stride = output_stride
        stem_channels = 128 if deep else 64
        self.conv1 = deep_stem() if deep else nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = make_stage(stem_channels, 64, depths[0])
        self.layer2 = make_stage(256, 128, depths[1], stride=2)
        # A dilated stage keeps the resolution and dilates its later blocks instead of striding; the
        # next stage starts at the dilation reached (torchvision's replace_stride_with_dilation).
        if output_stride == 16:
            self.layer3 = make_stage(512, 256, depths[2], stride=2)
            self.layer4 = make_stage(1024, 512, depths[3], first_dilation=1, dilation=2)
        else:
            self.layer3 = make_stage(512, 256, depths[2], first_dilation=1, dilation=2)
            self.layer4 = make_stage(1024, 512, depths[3], first_dilation=2, dilation=4)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return c1, c4


def make_stage(
    cin: int, planes: int, blocks: int, stride: int = 1, first_dilation: int = 1, dilation: int = 1
) -> nn.Sequential:
    """`blocks` bottlenecks; the first one strides (torchvision's replace_stride_with_dilation rule)."""
    width = planes * Bottleneck.expansion
    layers = [Bottleneck(cin, planes, stride, first_dilation)]
    layers += [Bottleneck(width, planes, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet50(output_stride: int = 16) -> ResNet:
    """Deep-stem ResNet-50 (UniMatch's resnet50.pth)."""
    return ResNet((3, 4, 6, 3), output_stride=output_stride)


def resnet101(output_stride: int = 16) -> ResNet:
    """Deep-stem ResNet-101 (UniMatch's resnet101.pth)."""
    return ResNet((3, 4, 23, 3), output_stride=output_stride)


def resnet50_tv(output_stride: int = 16) -> ResNet:
    """ResNet-50 with torchvision's 7x7 stem (torchvision's ImageNet weights)."""
    return ResNet((3, 4, 6, 3), deep=False, output_stride=output_stride)


def resnet101_tv(output_stride: int = 16) -> ResNet:
    """ResNet-101 with torchvision's 7x7 stem (torchvision's ImageNet weights)."""
    return ResNet((3, 4, 23, 3), deep=False, output_stride=output_stride)
