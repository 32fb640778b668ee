"""The strong views, built batched: each sample's parameters were drawn in the loader
(`trainers.augment`), and one `finish` turns a raw batch into the method's batch wherever it lives.

`fast.device_augment` chooses where: in the loader's collate (CPU) or after the copy to the training
device (GPU). Every batched op computes what the seed's per-sample op (`trainers.augment_reference`)
computes: same formulas, same uint8 rounding; the blur is separable, which moves a rare pixel by 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainers import augment
from trainers.augment import Box, Photometric
from trainers.batch import LabeledBatch, UnlabeledBatch, map_tensors

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
    """torchvision's 1-D Gaussian kernel (float32), size 2·ceil(3σ) + 1 like the reference blur."""
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
    noise: list[torch.Tensor | None]
    """Per sample, the (3, h, w) uint8 values of its cutout box (`augment.draw_noise`), or None."""

    @classmethod
    def of(
        cls, params: Sequence[Photometric], noise: Sequence[torch.Tensor | None] | None = None
    ) -> ViewParams:
        """Tensors for the batched ops from each sample's drawn parameters (and cutout values)."""
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
            noise=list(noise),
        )


def photometric_batch(images: torch.Tensor, view: ViewParams) -> torch.Tensor:
    """`augment_reference.photometric` of each sample with its own parameters: jitter, gray, blur, cutout."""
    out = images.clone()
    for op, rows in view.steps:
        ratio, rest = view.factors[rows, op].view(-1, 1, 1, 1), view.rests[rows, op].view(-1, 1, 1, 1)
        out[rows] = JITTER_OPS[op](out[rows], ratio, rest)
    if len(view.gray_rows):
        out[view.gray_rows] = _luma(out[view.gray_rows]).to(torch.uint8).expand(-1, 3, -1, -1)
    if len(view.blur_rows):
        out[view.blur_rows] = blur_batch(out[view.blur_rows], view.kernels)
    for i, (params, noise) in enumerate(zip(view.params, view.noise, strict=True)):
        box = params.cutout
        if box is not None:
            out[i, :, box.top : box.top + box.height, box.left : box.left + box.width] = noise
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
    """(B, H, W) uint8 class ids, the dataset's ignore index where unlabeled or padded."""
    strong: ViewParams | None = None
    """The strong view's parameters (`ViewSpec.labeled_strong`), or None."""

    def finish(self) -> LabeledBatch:
        """The normalized LabeledBatch (and its strong view), computed where this batch lives."""
        strong = None
        if self.strong is not None:
            strong = augment.normalize(augment.to_unit(photometric_batch(self.image, self.strong)))
        return LabeledBatch(augment.normalize(augment.to_unit(self.image)), self.mask.long(), strong)


@dataclass
class RawUnlabeledBatch(_Movable):
    base: torch.Tensor
    """(B, 3, H, W) uint8 crops: the weak view before normalization."""
    ignore: torch.Tensor
    """(B, H, W) uint8: the dataset's ignore index where the crop was padded, 0 elsewhere."""
    strong: list[ViewParams]
    boxes: list[list[Box | None]]
    """Per strong view, each sample's CutMix box."""
    cutout_view: ViewParams | None
    cutout_view_normalized: bool
    mask: torch.Tensor | None = None
    """(B, H, W) uint8 crops of the unlabeled list's masks (ViewSpec.masks), or None."""

    def finish(self) -> UnlabeledBatch:
        """The views of `augment_reference.unlabeled_transform`, built where this batch lives."""
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
            mask=None if self.mask is None else self.mask.long(),
            cutouts=[[p.cutout for p in view.params] for view in self.strong],
        )


def collate_raw_labeled(items: list[dict]) -> RawLabeledBatch:
    """Stack raw labeled samples (and their strong views' parameters)."""
    strong = None
    if items[0]["strong"] is not None:
        strong = ViewParams.of([i["strong"] for i in items], [None] * len(items))
    image, mask = torch.stack([i["image"] for i in items]), torch.stack([i["mask"] for i in items])
    return RawLabeledBatch(image, mask, strong)


def collate_raw_unlabeled(items: list[dict]) -> RawUnlabeledBatch:
    """Stack raw unlabeled samples and turn their parameters into per-view tensors."""
    first = items[0]
    return RawUnlabeledBatch(
        base=torch.stack([i["base"] for i in items]),
        ignore=torch.stack([i["ignore"] for i in items]),
        strong=[
            ViewParams.of([i["strong"][v] for i in items], [i["strong_noise"][v] for i in items])
            for v in range(len(first["strong"]))
        ],
        boxes=[[i["boxes"][v] for i in items] for v in range(len(first["boxes"]))],
        cutout_view=None
        if first["cutout_view"] is None
        else ViewParams.of([i["cutout_view"] for i in items], [i["cutout_view_noise"] for i in items]),
        cutout_view_normalized=first["cutout_view_normalized"],
        mask=None if first["mask"] is None else torch.stack([i["mask"] for i in items]),
    )


def _finish(collate: Callable[[list[dict]], Any], items: list[dict]) -> Any:
    return collate(items).finish()


def finished(collate: Callable[[list[dict]], Any]) -> Callable[[list[dict]], Any]:
    """`collate` followed by `finish`: the views built in the loader (a partial, so workers can pickle it)."""
    return functools.partial(_finish, collate)
