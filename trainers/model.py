"""DeepLabV3+ as UniMatch builds it; parameter names match its checkpoints.

The network is plain: `encode`, `decode`, `forward`. Feature perturbation and anything
distributed live elsewhere (trainers.forward, trainers.dist).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainers.backbones import BACKBONES, DILATABLE
from trainers.config import ConfigError, choice


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ASPPPooling(nn.Module):
    """Image-level pooling branch: global average, 1x1 conv, BN, ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, conv, bn, relu = self.gap
        y = conv(pool(x))
        if self.training and y.shape[0] == 1:
            # One sample of 1x1 gives BatchNorm no batch statistics: use the running ones.
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = bn(y)
        return upsample(relu(y), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; projected by 1x1."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int]) -> None:
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"ASPP dilations: expected 3 rates, got {tuple(dilations)}")
        self.b0 = conv_bn_relu(cin, cout)
        self.b1 = conv_bn_relu(cin, cout, 3, dilations[0])
        self.b2 = conv_bn_relu(cin, cout, 3, dilations[1])
        self.b3 = conv_bn_relu(cin, cout, 3, dilations[2])
        self.b4 = ASPPPooling(cin, cout)
        self.project = conv_bn_relu(5 * cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


def build_backbone(name: str, output_stride: int | None) -> nn.Module:
    """The named backbone at `output_stride` (None: its own); one ConfigError for a stride it lacks."""
    factory = choice("model.backbone", name, BACKBONES)
    if name in DILATABLE and output_stride is not None:
        return factory(output_stride=output_stride)
    net = factory()
    if output_stride not in (None, net.output_stride):
        raise ConfigError(
            f"model.output_stride: backbone {name} has output stride {net.output_stride} only, got "
            f"{output_stride} (8 or 16: one of {list(DILATABLE)})"
        )
    return net


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a named backbone of `trainers.backbones.BACKBONES` at its output stride (16; 8 for
    `small`), or at `output_stride` 8 or 16 for the ResNets."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        dilations: Sequence[int] = (6, 12, 18),
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, output_stride)
        low, high = self.backbone.low_channels, self.backbone.high_channels
        reduce, fuse = self.backbone.reduce_channels, self.backbone.fuse_channels
        self.head = ASPP(high, high // 8, dilations)
        self.reduce = conv_bn_relu(low, reduce)
        self.fuse = nn.Sequential(*conv_bn_relu(high // 8 + reduce, fuse, 3), *conv_bn_relu(fuse, fuse, 3))
        self.classifier = nn.Conv2d(fuse, num_classes, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (c1 at stride 4, c4 at the output stride)."""
        return self.backbone(x)

    def decode(self, c1: torch.Tensor, c4: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits at `size` (H, W) from the two feature maps."""
        high = upsample(self.head(c4), c1.shape[-2:])
        feature = self.fuse(torch.cat([self.reduce(c1), high], dim=1))
        return upsample(self.classifier(feature), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) at the input's resolution."""
        c1, c4 = self.encode(x)
        return self.decode(c1, c4, x.shape[-2:])

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the base lr."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything outside the backbone, trained at lr * lr_multi."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
