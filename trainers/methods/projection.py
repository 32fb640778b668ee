"""The decoder's fused features and a representation head on them (U2PL's contrastive branch).

`fused` repeats the first half of `DeepLabV3Plus.decode` so the network itself stays method-free;
a `decode_features` on the model would remove the repetition.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.model import DeepLabV3Plus, upsample


def fused(net: DeepLabV3Plus, x: torch.Tensor) -> torch.Tensor:
    """The decoder's input at stride 4: reduced low-level features ⊕ upsampled ASPP output."""
    c1, c4 = net.encode(x)
    high = upsample(net.head(c4), c1.shape[-2:])
    return torch.cat([net.reduce(c1), high], dim=1)


def classify(net: DeepLabV3Plus, features: torch.Tensor) -> torch.Tensor:
    """Logits at stride 4 from the fused features (the rest of `decode`, without the upsampling)."""
    return net.classifier(net.fuse(features))


def fused_channels(net: DeepLabV3Plus) -> int:
    """Channels of `fused(net, x)`: what the decoder's first convolution takes."""
    return net.fuse[0].in_channels


class RepresentationHead(nn.Sequential):
    """U2PL's representation head: two 3x3 conv-BN-ReLU-dropout blocks and a 1x1 projection."""

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, dim, 1),
        )
