"""The fast path: its switches resolved for a device, and strong views built batched on the device.

With `fast.device_augment` the loader workers only decode, crop and draw each sample's random parameters
(`raw_unlabeled_transform`); after the copy to the device, `to_device` applies the photometric ops to
the whole batch, each sample with its own parameters. Every batched op computes what the per-sample op
of `trainers.augment` computes (same formulas, same uint8 rounding; the blur is separable, which moves
a rare pixel by 1), so the switch moves the work, not the result. benchmarks/ measures what it saves.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers import augment
from trainers.augment import IGNORE, UNLABELED_PAD, Box, Photometric
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec, map_tensors
from trainers.config import FastConfig


@dataclass(frozen=True)
class FastSettings:
    """`FastConfig` with every null resolved for one device."""

    channels_last: bool
    autocast_bf16: bool
    device_augment: bool
    decode: str
    foreach: bool
    compile: bool


def settings(cfg: FastConfig, device: torch.device) -> FastSettings:
    """Resolve the nulls of `cfg` for `device` (FastConfig documents each default)."""
    gpu = device.type == "cuda"

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    return FastSettings(
        channels_last=pick(cfg.channels_last, True),
        autocast_bf16=pick(cfg.autocast_bf16, gpu),
        device_augment=pick(cfg.device_augment, gpu),
        decode=cfg.decode,
        foreach=cfg.foreach,
        compile=cfg.compile,
    )


def autocast(fast: FastSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when switched on; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast.autocast_bf16)


def prepare_network(net: nn.Module, fast: FastSettings) -> nn.Module:
    """`net` in channels_last and with its parts compiled, as switched; parameters keep their identity."""
    if fast.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if fast.compile:
        # Parts, not the whole: methods call encode/decode directly (feature perturbation).
        for part in (net.backbone, net.head, net.reduce, net.fuse):
            part.compile()
    return net


# ---- photometric ops on (B, 3, H, W) uint8 batches, one parameter per sample ----


def _luma(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    # torchvision: image * ratio + other * (1 - ratio), clamped and truncated; `rest` = 1 - ratio in double.
    return torch.addcmul(image.float().mul_(ratio), other, rest).clamp_(0, 255).to(torch.uint8)


def _brightness(image: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    return image.float().mul_(ratio).clamp_(0, 255).to(torch.uint8)


def _contrast(image: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    mean = _luma(image).floor_().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, ratio, rest)


def _saturation(image: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    return _blend(image, _luma(image).floor_(), ratio, rest)


def _hue(image: torch.Tensor, shift: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(image.float().mul_(1.0 / 255))
    rgb = _hsv_to_rgb(h.add_(shift[:, 0]).remainder_(1.0), s, v)
    return rgb.mul_(255 + 1.0 - 1e-3).to(torch.uint8)


JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _brightness,
    _contrast,
    _saturation,
    _hue,
)
"""Indexed like `Jitter.order`: brightness 0, contrast 1, saturation 2, hue 3."""


def _rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torchvision's (PIL's) formulas, step for step, so the rounding matches its adjust_hue.
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    not_r, is_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(is_g & not_r)
    hr = bc.sub_(gc).mul_(~not_r)
    hb = gc.add_(4.0).sub_(rc).mul_(not_r.logical_and_(is_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    return vpqt.gather(-3, _hsv_table(vpqt.device)[:, i].moveaxis(0, -3))


@functools.lru_cache(maxsize=8)
def _hsv_table(device: torch.device) -> torch.Tensor:
    # Which of (v, p, q, t) each of r, g, b takes in hue sector 0..5; made once per device, so the
    # per-step ops copy nothing from the host.
    return torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=device)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel (float32) for `augment.gaussian_blur`'s size 2·ceil(3σ) + 1."""
    size = 2 * math.ceil(3 * sigma) + 1
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, dtype=torch.float32)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)


def blur_batch(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, 3, H, W) uint8 with per-sample (n, K) kernels, reflect-padded."""
    n, c, h, w = image.shape
    k = kernels.shape[1]
    weights = kernels.to(image.device).repeat_interleave(c, dim=0)[:, None]
    x = F.pad(image.float().reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
    x = F.conv2d(x, weights[..., None], groups=n * c)
    x = F.conv2d(x, weights[:, :, None, :], groups=n * c)
    return x.reshape(n, c, h, w).round_().to(torch.uint8)


@dataclass
class ViewParams:
    """One strong view's parameters for a batch: host lists steer which samples an op touches, tensors
    (moved with the batch) carry the values, so building the view on a GPU needs no host sync."""

    params: list[Photometric]
    factors: torch.Tensor
    """(B, 4) float32 jitter factors: brightness, contrast, saturation, hue."""
    rests: torch.Tensor
    """(B, 4) float32: 1 - factor, computed in double as torchvision's blend does."""
    steps: list[tuple[int, torch.Tensor]]
    """Jitter in application order: (op, rows of the samples applying op at this position)."""
    gray_rows: torch.Tensor
    blur_rows: torch.Tensor
    kernels: torch.Tensor
    """(len(blur_rows), K) 1-D kernels, zero-padded to the widest."""

    @classmethod
    def of(cls, params: Sequence[Photometric]) -> ViewParams:
        """Tensors for the batched ops from each sample's drawn parameters."""
        identity = augment.Jitter((0, 1, 2, 3), 1.0, 1.0, 1.0, 0.0)
        jitters = [p.jitter or identity for p in params]
        values = [[j.brightness, j.contrast, j.saturation, j.hue] for j in jitters]
        steps = []
        for position in range(4):
            for op in range(4):
                rows = [
                    i for i, p in enumerate(params) if p.jitter is not None and p.jitter.order[position] == op
                ]
                if rows:
                    steps.append((op, torch.tensor(rows)))
        blurred = [i for i, p in enumerate(params) if p.blur_sigma is not None]
        kernels = [gaussian_kernel(params[i].blur_sigma) for i in blurred]
        width = max((len(k) for k in kernels), default=1)
        padded = torch.zeros(len(kernels), width)
        for row, kernel in enumerate(kernels):
            start = (width - len(kernel)) // 2
            padded[row, start : start + len(kernel)] = kernel
        return cls(
            params=list(params),
            factors=torch.tensor(values, dtype=torch.float32),
            rests=torch.tensor([[1.0 - v for v in row] for row in values], dtype=torch.float32),
            steps=steps,
            gray_rows=torch.tensor([i for i, p in enumerate(params) if p.grayscale], dtype=torch.int64),
            blur_rows=torch.tensor(blurred, dtype=torch.int64),
            kernels=padded,
        )


def photometric_batch(images: torch.Tensor, view: ViewParams) -> torch.Tensor:
    """`augment.photometric` of every sample with its own parameters: jitter, grayscale, blur, cutout."""
    out = images.clone()
    for op, rows in view.steps:
        ratio, rest = view.factors[rows, op].view(-1, 1, 1, 1), view.rests[rows, op].view(-1, 1, 1, 1)
        out[rows] = JITTER_OPS[op](out[rows], ratio, rest)
    if len(view.gray_rows):
        out[view.gray_rows] = _luma(out[view.gray_rows]).to(torch.uint8).expand(-1, 3, -1, -1)
    if len(view.blur_rows):
        out[view.blur_rows] = blur_batch(out[view.blur_rows], view.kernels)
    for i, params in enumerate(view.params):
        box = params.cutout
        if box is not None:
            region = out[i, :, box.top : box.top + box.height, box.left : box.left + box.width]
            region.copy_(torch.randint(0, 255, region.shape, device=out.device))
    return out


def box_masks(boxes: Sequence[Box | None], size: int, device: torch.device) -> torch.Tensor:
    """(B, size, size) int64 CutMix masks, 1 inside each sample's box (all 0 for None)."""
    # One allocation on the device, each box painted into its row: no per-sample tensors to stack.
    out = torch.zeros(len(boxes), size, size, dtype=torch.int64, device=device)
    for row, box in zip(out, boxes, strict=True):
        if box is not None:
            box.fill(row)
    return out


# ---- raw batches: uint8 crops plus parameters, finished into LabeledBatch / UnlabeledBatch ----


class _Movable:
    def to(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Any:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return map_tensors(self, lambda t: t.pin_memory())


@dataclass
class RawLabeledBatch(_Movable):
    image: torch.Tensor
    """(B, 3, H, W) uint8."""
    mask: torch.Tensor
    """(B, H, W) uint8 class ids, 255 = ignore."""

    def finish(self) -> LabeledBatch:
        """The normalized LabeledBatch, computed where this batch lives."""
        return LabeledBatch(augment.normalize(augment.to_unit(self.image)), self.mask.long())


@dataclass
class RawUnlabeledBatch(_Movable):
    base: torch.Tensor
    """(B, 3, H, W) uint8 crops: the weak view before normalization."""
    ignore: torch.Tensor
    """(B, H, W) uint8: 255 where the crop was padded."""
    strong: list[ViewParams]
    boxes: list[list[Box | None]]
    """Per strong view, each sample's CutMix box."""
    cutout_view: ViewParams | None
    cutout_view_normalized: bool

    def finish(self) -> UnlabeledBatch:
        """The UnlabeledBatch of `augment.unlabeled_transform`, computed where this batch lives."""
        size = self.base.shape[-1]

        def view(params: ViewParams) -> torch.Tensor:
            return augment.to_unit(photometric_batch(self.base, params))

        cutout_view = None
        if self.cutout_view is not None:
            cutout_view = view(self.cutout_view)
            cutout_view = augment.normalize(cutout_view) if self.cutout_view_normalized else cutout_view
        return UnlabeledBatch(
            weak=augment.normalize(augment.to_unit(self.base)),
            strong=[augment.normalize(view(p)) for p in self.strong],
            boxes=[box_masks(b, size, self.base.device) for b in self.boxes],
            ignore=self.ignore.long(),
            cutout_view=cutout_view,
        )


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (or None) to `device`; a raw batch is then finished there."""
    if batch is None:
        return None
    batch = batch.to(device, non_blocking=True)
    return batch.finish() if isinstance(batch, (RawLabeledBatch, RawUnlabeledBatch)) else batch


def raw_labeled_transform(
    crop_size: int, scale_range: tuple[float, float] = augment.SCALE_RANGE
) -> Callable[[Any, Any], dict]:
    """Labeled sample -> uint8 crop and mask (normalized on the device)."""

    def transform(image: Any, mask: Any) -> dict:
        image, mask = augment.crop_pair(image, mask, crop_size, IGNORE, scale_range)
        return {"image": image, "mask": mask.to(torch.uint8)}

    return transform


def raw_unlabeled_transform(
    crop_size: int, views: ViewSpec, scale_range: tuple[float, float] = augment.SCALE_RANGE
) -> Callable[[Any, Any], dict]:
    """Unlabeled sample -> uint8 crop, padding mask, and the views' parameters, drawn in the same order
    as `augment.unlabeled_transform` draws them."""

    def transform(image: Any, mask: Any) -> dict:
        base, mask = augment.crop_pair(image, mask, crop_size, UNLABELED_PAD, scale_range)
        strong, boxes = [], []
        for _ in range(views.strong_views):
            strong.append(augment.draw_photometric(crop_size, crop_size, cutout=views.cutout))
            boxes.append(augment.draw_cutmix(crop_size))
        cutout_view = None
        if views.cutout_view:
            cutout_view = augment.draw_photometric(crop_size, crop_size, cutout=True)
        return {
            "base": base,
            "ignore": torch.where(mask == UNLABELED_PAD, IGNORE, 0).to(torch.uint8),
            "strong": strong,
            "boxes": boxes,
            "cutout_view": cutout_view,
            "cutout_view_normalized": views.cutout_view_normalized,
        }

    return transform


def collate_raw_labeled(items: list[dict]) -> RawLabeledBatch:
    """Stack raw labeled samples."""
    return RawLabeledBatch(torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items]))


def collate_raw_unlabeled(items: list[dict]) -> RawUnlabeledBatch:
    """Stack raw unlabeled samples and turn their parameters into per-view tensors."""
    first = items[0]
    return RawUnlabeledBatch(
        base=torch.stack([i["base"] for i in items]),
        ignore=torch.stack([i["ignore"] for i in items]),
        strong=[ViewParams.of([i["strong"][v] for i in items]) for v in range(len(first["strong"]))],
        boxes=[[i["boxes"][v] for i in items] for v in range(len(first["boxes"]))],
        cutout_view=None
        if first["cutout_view"] is None
        else ViewParams.of([i["cutout_view"] for i in items]),
        cutout_view_normalized=first["cutout_view_normalized"],
    )
