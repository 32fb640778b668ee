"""Backbone variants by name. Each returns a module whose `forward(x)` gives (c1, c4).

c1: stride 4 with `low_channels`; c4: stride `output_stride` (16; 8 for `small`) with
`high_channels`. `reduce_channels` and `fuse_channels` are the decoder widths the model pairs
with the backbone. The ResNets also build at output stride 8 (`DILATABLE`).
"""

from __future__ import annotations

from trainers.backbones.resnet import resnet50, resnet50_tv, resnet101, resnet101_tv
from trainers.backbones.small import small
from trainers.backbones.tiny import tiny
from trainers.backbones.xception import xception65

DILATABLE = ("resnet50", "resnet101", "resnet50_tv", "resnet101_tv")
"""Backbones whose factory takes `output_stride` (16 or 8)."""
BACKBONES = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet50_tv": resnet50_tv,
    "resnet101_tv": resnet101_tv,
    "xception65": xception65,
    "tiny": tiny,
    "small": small,
}
