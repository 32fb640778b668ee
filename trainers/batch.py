"""Named batches passed from the data pipeline to the methods (no positional tuples)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # trainers.augment imports this module
    from trainers.augment import Box


@dataclass(frozen=True)
class ViewSpec:
    """Which unlabeled views a method needs; the augmentation builds exactly these."""

    strong_views: int = 0
    """Number of strong views with a CutMix box each (0 = no unlabeled data)."""
    cutout: bool = False
    """MSPL, ST++: also apply a random-valued cutout box to each strong view."""
    cutout_view: bool = False
    """MSPL: build the third strong view (jitter, grayscale, blur, cutout; no CutMix box)."""
    cutout_view_normalized: bool = False
    """False reproduces the published quirk: the cutout view is only scaled to [0, 1]."""
    mix_batch: bool = False
    """Needs the second unlabeled batch u' that supplies CutMix patches."""
    independent_mix: bool = False
    """False reproduces the published quirk: u' holds the same images as u, in the same order."""
    labeled_strong: bool = False
    """PS-MT: also build a strong view (jitter, grayscale, blur; no box) of each labeled crop."""
    masks: bool = False
    """ST++ (offline pseudo-labels): read the unlabeled list's masks and crop them with the views."""


@dataclass
class LabeledBatch:
    image: torch.Tensor
    """(B, 3, H, W) float, ImageNet-normalized."""
    mask: torch.Tensor
    """(B, H, W) int64 class ids, 255 = ignore (also crop padding)."""
    strong: torch.Tensor | None = None
    """(B, 3, H, W) like `image`, the strong view `ViewSpec.labeled_strong` asks for; else None."""

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
    mask: torch.Tensor | None = None
    """(B, H, W) int64 crops of the unlabeled list's masks (ViewSpec.masks), ignore where padded; or None."""
    cutouts: list[list[Box | None]] = field(default_factory=list)
    """Per strong view, each sample's cutout `augment.Box` (None: no cutout), for targets to mask out."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UnlabeledBatch:
        return _to(self, device, non_blocking)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in it, walking lists, tuples and dataclasses.

    Frozen dataclasses (view parameters such as boxes and jitter factors) hold no tensors and are
    returned as they are, so moving or pinning a batch does not rebuild every sample's parameters."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if is_dataclass(value) and not isinstance(value, type) and not value.__dataclass_params__.frozen:
        return replace(value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in fields(value)})
    return value


def _to(batch: Any, device: torch.device | str, non_blocking: bool) -> Any:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))
