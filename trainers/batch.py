"""Named batches passed from the data pipeline to the methods (no positional tuples)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class ViewSpec:
    """Which unlabeled views a method needs; the augmentation builds exactly these."""

    strong_views: int = 0
    """Number of strong views with a CutMix box each (0 = no unlabeled data)."""
    cutout: bool = False
    """MSPL: also apply a random-valued cutout box to each strong view."""
    cutout_view: bool = False
    """MSPL: build the third strong view (jitter, grayscale, blur, cutout; no CutMix box)."""
    cutout_view_normalized: bool = False
    """False reproduces the published quirk: the cutout view is only scaled to [0, 1]."""
    mix_batch: bool = False
    """Needs the second unlabeled batch u' that supplies CutMix patches."""


@dataclass
class LabeledBatch:
    image: torch.Tensor
    """(B, 3, H, W) float, ImageNet-normalized."""
    mask: torch.Tensor
    """(B, H, W) int64 class ids, 255 = ignore (also crop padding)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabeledBatch:
        return _to(self, device, non_blocking)


@dataclass
class UnlabeledBatch:
    weak: torch.Tensor
    """(B, 3, H, W) float, ImageNet-normalized, geometry only."""
    strong: list[torch.Tensor]
    """ViewSpec.strong_views tensors like `weak`, photometric augmentation (and cutout) applied."""
    boxes: list[torch.Tensor]
    """One (B, H, W) int64 0/1 CutMix box mask per strong view."""
    ignore: torch.Tensor
    """(B, H, W) int64: 255 where the crop was padded, 0 elsewhere."""
    cutout_view: torch.Tensor | None = None
    """(B, 3, H, W) MSPL's cutout view, or None."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UnlabeledBatch:
        return _to(self, device, non_blocking)


def _move(value, device, non_blocking):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, list):
        return [_move(v, device, non_blocking) for v in value]
    return value


def _to(batch, device, non_blocking):
    changes = {f.name: _move(getattr(batch, f.name), device, non_blocking) for f in fields(batch)}
    return replace(batch, **changes)
